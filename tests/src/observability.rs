//! What the observability tests need: where a server serves its metrics, a scrape and a
//! parser of the Prometheus text format, and a real OTLP/gRPC receiver that keeps every
//! span the servers export.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{eventually, Server};

/// Path of promtool (Prometheus' rule and exposition checker), or a panic saying how to
/// get one: `PROMTOOL_BIN`, `.tools/bin/promtool`, or PATH.
pub fn promtool_bin() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("PROMTOOL_BIN") {
        return path.into();
    }
    let local = crate::workspace_root().join(".tools/bin/promtool");
    if local.exists() {
        return local;
    }
    if let Ok(output) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    {
        if output.status.success() {
            return "promtool".into();
        }
    }
    panic!("promtool not found: run scripts/ensure-promtool.sh (or scripts/test.sh), or set PROMTOOL_BIN")
}

/// Runs promtool with `args` and `stdin`; panics with its output unless it succeeds.
pub fn promtool(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool_bin())
        .args(args)
        .current_dir(crate::workspace_root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("promtool stdin");
    }
    let output = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names a PromQL expression uses (ours: `shop_*` and `grpc_server_*`).
pub fn metrics_in_promql(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if quoted {
            quoted = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("shop_") || word.starts_with("grpc_server_") {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
        quoted = c == '"';
    }
    names
}

/// Where a server started with `--metrics-listen 127.0.0.1:0` serves metrics, read from
/// its latest log line saying so.
pub async fn metrics_addr(server: &Server) -> SocketAddr {
    eventually(
        Duration::from_secs(10),
        "the metrics address in the log",
        || {
            let log = strip_ansi(&server.log());
            let found = log
                .lines()
                .rev()
                .find(|l| l.contains("serving Prometheus metrics at /metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.parse().ok());
            async move { found }
        },
    )
    .await
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An HTTP/1.1 GET; the status line's code, the headers and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`], or the I/O error (e.g. a connection the server closed).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 10 s"))??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, head.to_string(), body.to_string()))
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: the samples and the `# TYPE` of each metric family.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Scrapes `/metrics` at `addr`; panics unless it answers 200 in the text format.
    pub async fn from(addr: SocketAddr) -> Scrape {
        let (code, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        Scrape::parse(&body).unwrap_or_else(|e| panic!("unparsable scrape ({e}):\n{body}"))
    }

    /// Parses the Prometheus text exposition format (0.0.4).
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err(format!("line {}: bad TYPE", n + 1));
                };
                scrape.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            scrape
                .samples
                .push(parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?);
        }
        Ok(scrape)
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// The value, or 0 when there is no such sample.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Every metric family name (`# TYPE`) and every sample name.
    pub fn names(&self) -> BTreeSet<String> {
        self.types
            .keys()
            .cloned()
            .chain(self.samples.iter().map(|s| s.name.clone()))
            .collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return Err("no value".into()),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(inner) = rest.strip_prefix('{') {
        let end = inner.rfind('}').ok_or("unclosed labels")?;
        let mut chars = inner[..end].chars().peekable();
        loop {
            while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
                chars.next();
            }
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if key.is_empty() {
                break;
            }
            if chars.next() != Some('"') {
                return Err(format!("label {key} without a quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.insert(key, value);
        }
        &inner[end + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A span as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting process.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
}

/// A real OTLP/gRPC trace receiver on a free port, keeping every span it is sent.
pub struct SpanReceiver {
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Collect {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(any_value_text)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    kv.value.as_ref().map(any_value_text).unwrap_or_default(),
                                )
                            })
                            .collect(),
                    });
                }
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn any_value_text(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SpanReceiver {
    pub async fn start() -> SpanReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Collect {
            spans: spans.clone(),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        SpanReceiver {
            endpoint: format!("http://{addr}"),
            spans,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for SpanReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let text = "# HELP a_total Help.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"uo\\\\te\"} 3\nb 4.5\nc_bucket{le=\"+Inf\"} 2\nd NaN\n";
        let scrape = Scrape::parse(text).expect("parse");
        assert_eq!(scrape.value("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(scrape.value("a_total", &[("y", "q\"uo\\te")]), Some(3.0));
        assert_eq!(scrape.value("b", &[]), Some(4.5));
        assert_eq!(scrape.value("c_bucket", &[("le", "+Inf")]), Some(2.0));
        assert!(scrape.value("d", &[]).is_some_and(f64::is_nan));
        assert_eq!(scrape.types["a_total"], "counter");
        assert!(Scrape::parse("bad{x=1} 2").is_err());
        assert!(Scrape::parse("x{a=\"1\"}").is_err());
    }

    #[test]
    fn finds_metric_names_in_promql() {
        let names = metrics_in_promql(
            r#"histogram_quantile(0.99, sum by (le, grpc_service) (rate(grpc_server_handling_seconds_bucket{grpc_type="unary", x="shop_not_a_metric"}[5m]))) / shop_log_position"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["grpc_server_handling_seconds_bucket", "shop_log_position"]
        );
    }

    #[test]
    fn strips_ansi_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m1"),
            "addr=1"
        );
    }
}
