//! The load of a trial: clients sending commands with unique ids to whichever server
//! writes, each command until it is answered (the same id on every attempt), and the
//! ledger of what was answered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shop_tests::pb;
use shop_tests::req;
use shop_tests::writers::{AnyWriter, Command, Sent};

/// An acknowledged command and its answer.
#[derive(Debug, Clone)]
pub struct Acked {
    pub command: Command,
    pub result: pb::CommandResult,
    pub at: Instant,
}

/// Everything the clients of a world sent.
#[derive(Debug, Default)]
pub struct Ledger {
    pub acked: Vec<Acked>,
    /// Sent, never answered (the client gave up when the load stopped).
    pub unanswered: Vec<Command>,
    /// Refused for a reason other than availability: each one is a violation (every
    /// command the clients send is valid and must succeed).
    pub refused: Vec<String>,
}

impl Ledger {
    /// The position of the first command acknowledged after `since`.
    pub fn first_ack_after(&self, since: Instant) -> Option<u64> {
        self.acked
            .iter()
            .rev()
            .take_while(|a| a.at > since)
            .last()
            .map(|a| a.result.position)
    }
}

/// What the clients of a world share across trials: the ledger, and each client's next
/// command number (ids stay unique across trials).
#[derive(Clone)]
pub struct Clients {
    pub ledger: Arc<Mutex<Ledger>>,
    next: Arc<Vec<AtomicU64>>,
    endpoints: Vec<String>,
}

/// The SKU client `c` restocks and orders.
pub fn sku(client: usize) -> String {
    format!("p{client}")
}

impl Clients {
    pub fn new(clients: usize, endpoints: Vec<String>) -> Clients {
        Clients {
            ledger: Arc::default(),
            next: Arc::new((0..clients).map(|_| AtomicU64::new(1)).collect()),
            endpoints,
        }
    }

    pub fn count(&self) -> usize {
        self.next.len()
    }

    pub fn acked(&self) -> usize {
        self.ledger.lock().map(|l| l.acked.len()).unwrap_or(0)
    }

    /// Starts the clients.
    pub fn start(&self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..self.count())
            .map(|client| tokio::spawn(self.clone().client_loop(client, stop.clone())))
            .collect();
        Load { stop, tasks }
    }

    /// Sends `command` until it is answered (or `give_up`), and records the outcome.
    pub async fn send(
        &self,
        writer: &mut AnyWriter,
        command: Command,
        give_up: impl Fn(usize) -> bool,
    ) -> Option<pb::CommandResult> {
        let sent = writer.send(&command, give_up).await;
        let mut ledger = self.ledger.lock().expect("ledger");
        match sent {
            Sent::Answered(answered) => {
                ledger.acked.push(Acked {
                    command,
                    result: answered.result.clone(),
                    at: Instant::now(),
                });
                Some(answered.result)
            }
            Sent::GaveUp => {
                ledger.unanswered.push(command);
                None
            }
            Sent::Refused(status) => {
                ledger.refused.push(format!(
                    "{} refused: {:?} {}",
                    command.id(),
                    status.code(),
                    status.message()
                ));
                None
            }
        }
    }

    /// Client `client`: mostly restocks of its product, and every tenth command a new
    /// customer, followed by an order of one unit for it (two events, the order and its
    /// reservation, so that half a command would show).
    async fn client_loop(self, client: usize, stop: Arc<AtomicBool>) {
        let mut writer = AnyWriter::new(self.endpoints.clone());
        let mut customer: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            let n = self.next[client].fetch_add(1, Ordering::Relaxed);
            let id = format!("c{client}-{n}");
            let command = match (n % 10, customer.take()) {
                (3, _) => {
                    let mut r = req::register(&id, &format!("{id}@chaos.test"));
                    r.command_id = id.clone();
                    Command::Register(r)
                }
                (4, Some(customer)) => {
                    let mut r = req::order(&format!("o-{id}"), &customer, &[(&sku(client), 1)]);
                    r.command_id = id.clone();
                    Command::PlaceOrder(r)
                }
                _ => Command::Restock(pb::RestockProductRequest {
                    command_id: id.clone(),
                    sku: sku(client),
                    quantity: 1,
                    ..Default::default()
                }),
            };
            let registering = matches!(command, Command::Register(_));
            // After the load stops: the retries of about two seconds more.
            let give_up = |retries| stop.load(Ordering::Relaxed) && retries > 100;
            if self.send(&mut writer, command, give_up).await.is_some() && registering {
                customer = Some(id);
            }
        }
    }
}

/// Running clients.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Stops the clients (each finishes or gives up its command) and waits for them.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
