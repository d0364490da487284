//! A 3-node NATS JetStream cluster on loopback: distinct client and route ports,
//! `server_name`s and store dirs, each node `kill -9`-able and restartable on the same
//! ports and store, and the leader of a stream found through the JetStream API.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::processes::{free_port, nats_server_bin, port_open};

/// Nodes in the cluster.
pub const NODES: usize = 3;

/// One node: its ports, name and store.
struct Node {
    name: String,
    port: u16,
    route_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A throwaway 3-node JetStream cluster, killed and removed on drop.
pub struct NatsCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream answers (a meta leader is elected).
    pub async fn start() -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("shop-nats-cluster-")
            .tempdir()
            .expect("tempdir");
        let nodes = (0..NODES)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                port: free_port(),
                route_port: free_port(),
                store: dir.path().join(format!("n{}", i + 1)),
                log: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
            })
            .collect();
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for i in 0..NODES {
            cluster.spawn(i);
        }
        for i in 0..NODES {
            cluster.wait_listening(i);
        }
        cluster.wait_jetstream().await;
        cluster
    }

    fn routes(&self, except: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != except)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let routes = self.routes(i);
        let node = &mut self.nodes[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("nats log");
        let child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["--server_name", &node.name, "--cluster_name", "shop"])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.route_port))
            .args(["--routes", &routes])
            .arg("-sd")
            .arg(&node.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        node.child = Some(child);
    }

    fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if port_open(self.nodes[i].port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "cluster node {} did not listen; its log:\n{}",
            self.nodes[i].name,
            self.log(i)
        );
    }

    /// Waits until JetStream answers API requests through the cluster.
    async fn wait_jetstream(&self) {
        let client = self.client().await;
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if js.query_account().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "JetStream never answered on the cluster; logs:\n{}",
            self.logs()
        );
    }

    /// Every node's client URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client that may connect to any node (and fails over).
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.urls().split(',').map(str::to_string).collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("connect to the cluster")
    }

    /// The node called `name` (`n1`..`n3`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node leading `stream`'s Raft group, if one is elected.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let js = async_nats::jetstream::new(self.client().await);
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        self.index_of(&leader)
    }

    /// The replicas `stream` has (its configuration).
    pub async fn stream_replicas(&self, stream: &str) -> Option<usize> {
        let js = async_nats::jetstream::new(self.client().await);
        let mut s = js.get_stream(stream).await.ok()?;
        Some(s.info().await.ok()?.config.num_replicas)
    }

    /// Kills node `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_listening(i);
    }

    /// The process id of node `i`, while running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        (0..NODES)
            .map(|i| format!("--- {} ---\n{}", self.nodes[i].name, self.log(i)))
            .collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}
