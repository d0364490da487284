//! A client of several command servers for one stream, only one of which writes (SPEC
//! §8): it sends each command until it is answered, moving to another server when one
//! says NOT_LEADER or cannot be reached, always with the same command id. For the
//! failover tests and the benchmark's failover stage.

use std::time::Duration;

use shop_shared::pb::command_service_client::CommandServiceClient;
use tonic::transport::Channel;

use crate::{pb, Server};

/// Which of `servers` writes (its `shop.v1.CommandService` is SERVING), once one does
/// (within 30 s).
pub async fn writer_of(servers: &[Server]) -> usize {
    crate::eventually(Duration::from_secs(30), "a writer", || async {
        for (i, s) in servers.iter().enumerate() {
            if s.is_writer().await {
                return Some(i);
            }
        }
        None
    })
    .await
}

/// One answered command.
#[derive(Debug, Clone)]
pub struct Answered {
    pub result: pb::CommandResult,
    /// Index of the server that answered.
    pub server: usize,
    /// Failed attempts before the answer.
    pub retries: usize,
}

/// Sends commands to whichever of `endpoints` writes.
pub struct AnyWriter {
    endpoints: Vec<String>,
    target: usize,
    client: Option<CommandServiceClient<Channel>>,
}

impl AnyWriter {
    pub fn new(endpoints: Vec<String>) -> Self {
        AnyWriter {
            endpoints,
            target: 0,
            client: None,
        }
    }

    async fn connect(endpoint: &str) -> Option<CommandServiceClient<Channel>> {
        Channel::from_shared(endpoint.to_string())
            .ok()?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .ok()
            .map(CommandServiceClient::new)
    }

    /// Sends `request` until it is answered, or until `give_up` says so after a failed
    /// attempt (`None`). A refusal that is not about availability panics: the
    /// callers send only commands that must succeed.
    pub async fn restock(
        &mut self,
        request: &pb::RestockProductRequest,
        give_up: impl Fn(usize) -> bool,
    ) -> Option<Answered> {
        let command = Command::Restock(request.clone());
        match self.send(&command, give_up).await {
            Sent::Answered(answered) => Some(answered),
            Sent::GaveUp => None,
            Sent::Refused(status) => panic!("{} refused: {status:?}", request.command_id),
        }
    }

    /// Sends `command` until it is answered, refused for a reason other than
    /// availability, or until `give_up` says so after a failed attempt.
    pub async fn send(&mut self, command: &Command, give_up: impl Fn(usize) -> bool) -> Sent {
        let mut retries = 0;
        loop {
            if self.client.is_none() {
                self.client = Self::connect(&self.endpoints[self.target]).await;
            }
            let answer = match self.client.as_mut() {
                Some(c) => command.send(c).await,
                None => Err(tonic::Status::unavailable("cannot connect")),
            };
            match answer {
                Ok(result) => {
                    return Sent::Answered(Answered {
                        result,
                        server: self.target,
                        retries,
                    })
                }
                Err(status) => {
                    if !retryable(&status) {
                        return Sent::Refused(status);
                    }
                    retries += 1;
                    let not_leader =
                        crate::status::reason(&status).as_deref() == Some("NOT_LEADER");
                    if not_leader
                        || self.client.is_none()
                        || status.code() != tonic::Code::Unavailable
                    {
                        self.target = (self.target + 1) % self.endpoints.len();
                        self.client = None;
                    }
                    if give_up(retries) {
                        return Sent::GaveUp;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Whether a refusal says nothing was decided, so that the same command may be sent
/// again: unavailable (no writer, storage, a restart), or shed under load.
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
    ) || transport_broke(status)
}

/// A status the client made up because the HTTP/2 connection broke under the request
/// (tonic reports it as `INTERNAL` "h2 protocol error"), not the server's answer: the
/// outcome is unknown, as with `UNAVAILABLE`. Seen when a command server restarts
/// in-process (a full disk freed) while a request was on its way.
fn transport_broke(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Internal && status.message().starts_with("h2 protocol error")
}

/// What became of a command sent by [`AnyWriter::send`].
#[derive(Debug)]
pub enum Sent {
    Answered(Answered),
    /// Refused for a reason other than availability (a decision, or a bad request).
    Refused(tonic::Status),
    /// `give_up` said so before an answer came.
    GaveUp,
}

/// A command [`AnyWriter`] can send.
#[derive(Debug, Clone)]
pub enum Command {
    Restock(pb::RestockProductRequest),
    Register(pb::RegisterCustomerRequest),
    PlaceOrder(pb::PlaceOrderRequest),
}

impl Command {
    /// The client-chosen command id.
    pub fn id(&self) -> &str {
        match self {
            Command::Restock(r) => &r.command_id,
            Command::Register(r) => &r.command_id,
            Command::PlaceOrder(r) => &r.command_id,
        }
    }

    async fn send(
        &self,
        client: &mut CommandServiceClient<Channel>,
    ) -> Result<pb::CommandResult, tonic::Status> {
        let reply = match self {
            Command::Restock(r) => client.restock_product(r.clone()).await,
            Command::Register(r) => client.register_customer(r.clone()).await,
            Command::PlaceOrder(r) => client.place_order(r.clone()).await,
        };
        reply.map(tonic::Response::into_inner)
    }
}
