//! The fault menu: what a trial does to the system, and its schedule drawn from the
//! trial's seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the command server (the writer), restarted on its data dir.
    KillCommand,
    /// `kill -9` of the query server, restarted on its data dir.
    KillQuery,
    /// `kill -9` of nats-server (one node of a cluster), restarted on its store.
    KillNats,
    /// SIGSTOP of the command server (the writer), SIGCONT 0.2–5 s later.
    PauseCommand,
    /// SIGSTOP of the query server, SIGCONT 0.2–5 s later.
    PauseQuery,
    /// SIGSTOP of nats-server (one node of a cluster), SIGCONT 0.2–5 s later.
    PauseNats,
    /// A clean stop (SIGTERM) of nats-server and a start on the same store.
    RestartNats,
    /// The filesystem under the command server's data dir fills up for 0.5–3 s.
    DiskFull,
    /// A power cut of the machine of both servers: both `kill -9`ed and every write they
    /// had not fsynced thrown away (the `powercut` shim), restarted 0–1 s later on what
    /// survived. NATS runs elsewhere and keeps running.
    PowerCut,
    /// `kill -9` of the writer while a standby follows (`--ack replicated`): the standby
    /// takes over; the old writer comes back as a standby.
    Failover,
    /// SIGSTOP of the writer for 0.2–5 s while a standby follows: longer than the lease
    /// TTL (1 s), it is deposed while paused and must not write after it wakes.
    PauseWriter,
    /// `kill -9` of one node of a 3-node NATS cluster (the stream's leader half of the
    /// time), restarted 0.5–3 s later.
    NodeLoss,
}

/// What a trial runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorldKind {
    /// One nats-server, one command server (`--ack local`), one query server.
    Single,
    /// One nats-server, a writer and a standby (`--ack replicated`, 1 s lease TTL), one
    /// query server.
    Failover,
    /// A 3-node NATS cluster (R3 stream), a writer and a standby (`--ack replicated`),
    /// one query server.
    Cluster,
}

const ALL: [(Fault, &str); 12] = [
    (Fault::KillCommand, "kill-command"),
    (Fault::KillQuery, "kill-query"),
    (Fault::KillNats, "kill-nats"),
    (Fault::PauseCommand, "pause-command"),
    (Fault::PauseQuery, "pause-query"),
    (Fault::PauseNats, "pause-nats"),
    (Fault::RestartNats, "restart-nats"),
    (Fault::DiskFull, "disk-full"),
    (Fault::PowerCut, "power-cut"),
    (Fault::Failover, "failover"),
    (Fault::PauseWriter, "pause-writer"),
    (Fault::NodeLoss, "node-loss"),
];

/// The default `--faults`: every fault alone, and pairs that overlap.
pub const DEFAULT_FAULTS: &str = "kill-command,kill-query,kill-nats,pause-command,pause-query,\
pause-nats,restart-nats,disk-full,power-cut,failover,pause-writer,node-loss,kill-command+kill-nats,\
pause-nats+kill-query,disk-full+kill-command,power-cut+kill-nats,failover+restart-nats,node-loss+failover";

impl Fault {
    pub fn name(self) -> &'static str {
        ALL.iter()
            .find(|(f, _)| *f == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    fn parse(name: &str) -> Result<Fault, String> {
        ALL.iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = ALL.iter().map(|(_, n)| *n).collect();
                format!("unknown fault {name:?}; faults: {}", names.join(", "))
            })
    }

    /// The least a world must have for this fault.
    fn needs(self) -> WorldKind {
        match self {
            Fault::Failover | Fault::PauseWriter => WorldKind::Failover,
            Fault::NodeLoss => WorldKind::Cluster,
            _ => WorldKind::Single,
        }
    }

    /// How long the fault lasts before it is healed (restart, SIGCONT, space freed).
    fn hold(self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            Fault::KillCommand | Fault::KillQuery | Fault::PowerCut => rng.random_range(0..1000),
            // Up to three lease TTLs: the old writer often comes back (and takes its lease
            // back) before the standby could take over, and as often not.
            Fault::Failover => rng.random_range(0..3000),
            Fault::KillNats => rng.random_range(0..2000),
            Fault::PauseCommand | Fault::PauseQuery | Fault::PauseNats | Fault::PauseWriter => {
                rng.random_range(200..5000)
            }
            Fault::RestartNats => 0,
            Fault::DiskFull => rng.random_range(500..3000),
            Fault::NodeLoss => rng.random_range(500..3000),
        };
        Duration::from_millis(ms)
    }
}

/// One entry of `--faults`: a fault, or two that overlap (`a+b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultKind {
    pub faults: Vec<Fault>,
}

impl FaultKind {
    pub fn parse(text: &str) -> Result<FaultKind, String> {
        let faults = text
            .split('+')
            .map(|f| Fault::parse(f.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if faults.len() > 2 {
            return Err(format!("{text:?}: at most two faults combine"));
        }
        let kind = FaultKind { faults };
        for special in [Fault::DiskFull, Fault::PowerCut] {
            if kind.faults.contains(&special) && kind.world() != WorldKind::Single {
                return Err(format!(
                    "{text:?}: {} runs on the single-writer world only",
                    special.name()
                ));
            }
        }
        if kind.faults.contains(&Fault::DiskFull) && kind.faults.contains(&Fault::PowerCut) {
            return Err(format!("{text:?}: disk-full and power-cut do not combine"));
        }
        Ok(kind)
    }

    pub fn parse_list(text: &str) -> Result<Vec<FaultKind>, String> {
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(FaultKind::parse)
            .collect()
    }

    pub fn name(&self) -> String {
        let names: Vec<&str> = self.faults.iter().map(|f| f.name()).collect();
        names.join("+")
    }

    /// The world its trials run on.
    pub fn world(&self) -> WorldKind {
        self.faults
            .iter()
            .map(|f| f.needs())
            .max()
            .unwrap_or(WorldKind::Single)
    }

    /// The trial's schedule: after `settle`, the first fault; the second (if any)
    /// `offset` later, so that the two overlap or follow closely.
    pub fn schedule(&self, rng: &mut StdRng) -> Schedule {
        let settle = Duration::from_millis(rng.random_range(0..500));
        let steps = self
            .faults
            .iter()
            .enumerate()
            .map(|(i, &fault)| Step {
                fault,
                at: settle
                    + if i == 0 {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(rng.random_range(0..1500))
                    },
                hold: fault.hold(rng),
                pick: rng.random(),
            })
            .collect();
        Schedule { steps }
    }
}

/// When each fault of a trial starts and how long it lasts.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub fault: Fault,
    /// From the trial's start.
    pub at: Duration,
    pub hold: Duration,
    /// A random number for the fault's choices (which NATS node).
    pub pick: u64,
}

/// An event of a schedule in time order: a fault starts or is healed.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Inject(usize),
    Heal(usize),
}

impl Schedule {
    /// Injections and heals in time order (by time from the trial's start).
    pub fn actions(&self) -> Vec<(Duration, Action)> {
        let mut actions: Vec<(Duration, Action)> = self
            .steps
            .iter()
            .enumerate()
            .flat_map(|(i, s)| [(s.at, Action::Inject(i)), (s.at + s.hold, Action::Heal(i))])
            .collect();
        actions.sort_by_key(|(t, a)| (*t, matches!(a, Action::Heal(_))));
        actions
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .steps
            .iter()
            .map(|s| {
                format!(
                    "{} at {} ms for {} ms",
                    s.fault.name(),
                    s.at.as_millis(),
                    s.hold.as_millis()
                )
            })
            .collect();
        parts.join(", ")
    }
}

/// The seed of trial `i` of `kind` in a run with seed `seed` (SplitMix64 of both).
pub fn trial_seed(seed: u64, kind: &FaultKind, i: usize) -> u64 {
    let mut h = seed;
    for b in kind.name().bytes().chain((i as u64).to_le_bytes()) {
        h = splitmix(h ^ u64::from(b));
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_default_list_parses_and_pairs_run_on_the_larger_world() {
        let kinds = FaultKind::parse_list(DEFAULT_FAULTS).expect("default faults");
        assert_eq!(kinds.len(), 18);
        assert!(FaultKind::parse("power-cut+failover").is_err());
        let pair = FaultKind::parse("node-loss+failover").expect("pair");
        assert_eq!(pair.world(), WorldKind::Cluster);
        assert!(FaultKind::parse("disk-full+failover").is_err());
        assert!(FaultKind::parse("kill-command+kill-query+kill-nats").is_err());
        assert!(FaultKind::parse("power").is_err());
    }

    #[test]
    fn a_seed_reproduces_a_schedule() {
        let kind = FaultKind::parse("kill-command+pause-nats").expect("pair");
        let a = kind.schedule(&mut StdRng::seed_from_u64(9));
        let b = kind.schedule(&mut StdRng::seed_from_u64(9));
        assert_eq!(a.describe(), b.describe());
        assert_ne!(trial_seed(1, &kind, 0), trial_seed(1, &kind, 1));
        let actions = a.actions();
        assert_eq!(actions.len(), 4);
        assert!(actions.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
