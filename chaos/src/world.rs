//! The processes a trial runs on, and the faults done to them.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

use shop_tests::cluster::NatsCluster;
use shop_tests::power::PowerRig;
use shop_tests::{signal, Nats, Server, ServerKind};

use crate::faults::{Fault, Step, WorldKind};
use crate::load::{sku, Clients};

pub const STREAM: &str = "SHOP_EVENTS";

/// NATS: one server or a 3-node cluster.
pub enum Bus {
    Single(Nats),
    Cluster(NatsCluster),
}

impl Bus {
    pub fn urls(&self) -> String {
        match self {
            Bus::Single(nats) => nats.url(),
            Bus::Cluster(cluster) => cluster.urls(),
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        match self {
            Bus::Single(nats) => nats.client().await,
            Bus::Cluster(cluster) => cluster.client().await,
        }
    }

    fn logs(&self) -> String {
        match self {
            Bus::Single(nats) => nats.log(),
            Bus::Cluster(cluster) => cluster.logs(),
        }
    }
}

/// A small filesystem (tmpfs) under the command server's data dir, that a trial fills.
pub struct Disk {
    mount: PathBuf,
    filler: PathBuf,
}

impl Disk {
    /// Mounts a tmpfs of `mb` MiB at `dir` (needs root, or the capability to mount).
    fn mount(dir: &Path, mb: usize) -> anyhow::Result<Disk> {
        std::fs::create_dir_all(dir)?;
        let status = Process::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "mounting a tmpfs at {} failed ({status}); disk-full trials need root \
             (or leave disk-full out of --faults)",
            dir.display()
        );
        Ok(Disk {
            mount: dir.to_path_buf(),
            filler: dir.join("filler"),
        })
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&self.filler)?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            if let Err(e) = file.write_all(&chunk) {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    // The last pages that fit.
                    while file.write_all(&chunk[..4096]).is_ok() {}
                    return Ok(());
                }
                return Err(e);
            }
        }
    }

    fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// The processes of one world, what its clients sent, and how many trials it has run.
pub struct World {
    pub kind: WorldKind,
    pub bus: Bus,
    /// One command server (`Single`), or a writer and a standby.
    pub commands: Vec<Server>,
    pub query: Server,
    pub clients: Clients,
    pub trials: usize,
    /// Which command server wrote last (a guess while a fault lasts).
    writer: usize,
    /// Which NATS node a fault stopped, per step of the trial.
    nodes: Vec<Option<usize>>,
    /// The power-cut rigs of the command and the query server (`power-cut` trials).
    power: Option<(PowerRig, PowerRig)>,
    /// Field order matters: the servers above are killed before the disk is unmounted.
    disk: Option<Disk>,
    _dir: tempfile::TempDir,
}

impl World {
    pub async fn start(
        kind: WorldKind,
        with_disk: bool,
        with_power: bool,
        clients: usize,
    ) -> anyhow::Result<World> {
        let dir = tempfile::Builder::new().prefix("shop-chaos-").tempdir()?;
        let bus = match kind {
            WorldKind::Cluster => Bus::Cluster(NatsCluster::start().await),
            _ => Bus::Single(Nats::start()),
        };
        let urls = bus.urls();
        let mut flags: Vec<&str> = Vec::new();
        if kind != WorldKind::Single {
            flags.extend(["--ack", "replicated", "--lease-ttl-ms", "1000"]);
        }
        if kind == WorldKind::Cluster {
            flags.extend(["--stream-replicas", "3"]);
        }
        let disk = if with_disk {
            Some(Disk::mount(&dir.path().join("disk"), 256)?)
        } else {
            None
        };
        let mut first = match &disk {
            Some(disk) => {
                let logs = dir.path().join("command-logs");
                std::fs::create_dir_all(&logs)?;
                Server::new(
                    ServerKind::Command,
                    &urls,
                    disk.mount.join("data"),
                    logs,
                    &flags,
                )
            }
            None => Server::in_temp_dir(ServerKind::Command, &urls, &flags),
        };
        let mut query = Server::in_temp_dir(ServerKind::Query, &urls, &[]);
        let power = with_power.then(|| {
            let rigs = (
                PowerRig::new(&first.data_dir),
                PowerRig::new(&query.data_dir),
            );
            first.set_env(rigs.0.env());
            query.set_env(rigs.1.env());
            rigs
        });
        first.spawn_until_listening();
        first.wait_serving().await;
        let mut commands = vec![first];
        if kind != WorldKind::Single {
            commands.push(Server::start_standby(&urls, &flags).await);
        }
        query.spawn_until_listening();
        query.wait_serving().await;
        let mut c = commands[0].commands().await;
        for client in 0..clients {
            c.create_product(shop_tests::req::product(&sku(client), 100, 1000))
                .await?;
        }
        let endpoints = commands.iter().map(Server::endpoint).collect();
        Ok(World {
            kind,
            bus,
            commands,
            query,
            clients: Clients::new(clients, endpoints),
            trials: 0,
            writer: 0,
            nodes: Vec::new(),
            power,
            disk,
            _dir: dir,
        })
    }

    /// The command server that writes now: asked, or the last one known while none
    /// answers (a fault may be stopping it).
    async fn current_writer(&mut self) -> usize {
        if self.commands.len() > 1 {
            for (i, s) in self.commands.iter().enumerate() {
                if s.is_writer().await {
                    self.writer = i;
                }
            }
        }
        self.writer
    }

    /// The NATS node a step acts on: the stream leader for odd picks (when one is
    /// known), any node otherwise.
    async fn node(&self, pick: u64) -> usize {
        match &self.bus {
            Bus::Single(_) => 0,
            Bus::Cluster(cluster) => {
                if pick % 2 == 1 {
                    if let Some(leader) = cluster.stream_leader(STREAM).await {
                        return leader;
                    }
                }
                (pick / 2 % 3) as usize
            }
        }
    }

    fn nats_pid(&self, node: usize) -> Option<u32> {
        match &self.bus {
            Bus::Single(nats) => nats.pid(),
            Bus::Cluster(cluster) => cluster.pid(node),
        }
    }

    /// Starts step `i`'s fault.
    pub async fn inject(&mut self, i: usize, step: &Step) -> anyhow::Result<()> {
        self.nodes.resize(self.nodes.len().max(i + 1), None);
        match step.fault {
            Fault::KillCommand | Fault::Failover => {
                let w = self.current_writer().await;
                self.commands[w].kill9();
                // A process death, not a power cut: its unsynced writes stay.
                if let Some(rigs) = &self.power {
                    rigs.0.settle();
                }
            }
            Fault::KillQuery => {
                self.query.kill9();
                if let Some(rigs) = &self.power {
                    rigs.1.settle();
                }
            }
            Fault::PauseCommand | Fault::PauseWriter => {
                let w = self.current_writer().await;
                if let Some(pid) = self.commands[w].pid() {
                    signal(pid, "STOP");
                }
            }
            Fault::PauseQuery => {
                if let Some(pid) = self.query.pid() {
                    signal(pid, "STOP");
                }
            }
            Fault::KillNats | Fault::NodeLoss => {
                let node = self.node(step.pick).await;
                self.nodes[i] = Some(node);
                match &mut self.bus {
                    Bus::Single(nats) => nats.kill(),
                    Bus::Cluster(cluster) => cluster.kill(node),
                }
            }
            Fault::PauseNats => {
                let node = self.node(step.pick).await;
                self.nodes[i] = Some(node);
                if let Some(pid) = self.nats_pid(node) {
                    signal(pid, "STOP");
                }
            }
            Fault::RestartNats => {
                let node = self.node(step.pick).await;
                self.nodes[i] = Some(node);
                match &mut self.bus {
                    Bus::Single(nats) => nats.stop(),
                    Bus::Cluster(cluster) => {
                        if let Some(pid) = cluster.pid(node) {
                            signal(pid, "TERM");
                        }
                    }
                }
            }
            Fault::PowerCut => {
                let rigs = self
                    .power
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("power-cut in a world without the rig"))?;
                self.commands[0].kill9();
                self.query.kill9();
                rigs.0.cut();
                rigs.1.cut();
            }
            Fault::DiskFull => {
                let disk = self
                    .disk
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("disk-full in a world without a disk"))?;
                disk.fill()?;
            }
        }
        Ok(())
    }

    /// Ends step `i`'s fault: restarts what was killed (without waiting for it to serve;
    /// the recovery wait does), continues what was paused, frees the disk.
    pub fn heal(&mut self, i: usize, step: &Step) {
        let node = self.nodes.get(i).copied().flatten().unwrap_or(0);
        match step.fault {
            Fault::KillCommand | Fault::Failover => {
                for s in &mut self.commands {
                    if !s.running() {
                        s.spawn_until_listening();
                    }
                }
            }
            Fault::PowerCut => {
                if !self.commands[0].running() {
                    self.commands[0].spawn_until_listening();
                }
                if !self.query.running() {
                    self.query.spawn_until_listening();
                }
            }
            Fault::KillQuery => {
                if !self.query.running() {
                    self.query.spawn_until_listening();
                }
            }
            Fault::PauseCommand | Fault::PauseWriter => {
                for s in &self.commands {
                    if let Some(pid) = s.pid() {
                        signal(pid, "CONT");
                    }
                }
            }
            Fault::PauseQuery => {
                if let Some(pid) = self.query.pid() {
                    signal(pid, "CONT");
                }
            }
            Fault::KillNats | Fault::NodeLoss | Fault::RestartNats => match &mut self.bus {
                Bus::Single(nats) => nats.restart(),
                Bus::Cluster(cluster) => cluster.restart(node),
            },
            Fault::PauseNats => {
                if let Some(pid) = self.nats_pid(node) {
                    signal(pid, "CONT");
                }
            }
            Fault::DiskFull => {
                if let Some(disk) = &self.disk {
                    disk.free();
                }
            }
        }
    }

    /// Processes that should run and do not (exited on their own), named.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.commands.iter_mut().chain([&mut self.query]) {
            if !s.running() {
                out.push(format!("{} on port {} exited", s.kind.binary(), s.port));
            }
        }
        out
    }

    /// Writes every process's log under `dir`.
    pub fn save_logs(&self, dir: &Path) {
        let _ = std::fs::create_dir_all(dir);
        for (i, s) in self.commands.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("command-{i}.log")), s.log());
        }
        let _ = std::fs::write(dir.join("query.log"), self.query.log());
        let _ = std::fs::write(dir.join("nats.log"), self.bus.logs());
    }

    /// How long to wait for the system to settle after a fault.
    pub fn patience(&self) -> Duration {
        match self.kind {
            WorldKind::Cluster => Duration::from_secs(90),
            _ => Duration::from_secs(60),
        }
    }
}
