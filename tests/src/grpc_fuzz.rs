//! A black-box fuzzer over gRPC (RELIABILITY.md): random and mutated protobuf bytes sent to
//! every RPC of a server, with valid, mutated or missing bearer tokens, through a
//! pass-through codec (the bytes reach the server as they are). What it checks is left to
//! the caller: the server stays up, and nothing is written by a refused request (every
//! accepted command's result is returned, to be matched against the log).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::pb;

/// One RPC to fuzz: its path, whether it streams responses, and valid requests to mutate.
pub struct Target {
    pub path: &'static str,
    pub server_streaming: bool,
    pub seeds: Vec<Vec<u8>>,
}

/// What a fuzzing run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    /// Responses by gRPC code name (transport failures as `transport`).
    pub codes: BTreeMap<String, u64>,
    /// Results of accepted commands (CommandService answers OK).
    pub accepted: Vec<pb::CommandResult>,
}

/// Bytes in, bytes out: tonic frames them, nothing is encoded or decoded.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Random bytes, or `seed` changed by one to four mutations.
fn mutate(rng: &mut SmallRng, seed: Option<&[u8]>) -> Vec<u8> {
    let Some(seed) = seed.filter(|_| rng.random_bool(0.8)) else {
        let len = rng.random_range(0..256);
        return (0..len).map(|_| rng.random()).collect();
    };
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..7) {
            0 if !bytes.is_empty() => {
                let i = at.min(bytes.len() - 1);
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !bytes.is_empty() => {
                let i = at.min(bytes.len() - 1);
                bytes[i] = rng.random();
            }
            2 => bytes.insert(at, rng.random()),
            3 => bytes.truncate(at),
            4 => {
                let end = rng.random_range(at..=bytes.len());
                bytes.drain(at..end);
            }
            5 => {
                let chunk: Vec<u8> = bytes[at..].iter().take(16).copied().collect();
                bytes.splice(at..at, chunk);
            }
            // A field with a random tag and wire type, and a few random bytes.
            _ => {
                bytes.push(rng.random());
                let n = rng.random_range(0..8);
                bytes.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    bytes
}

/// An `authorization` value: the valid one, a mutation of it, random bytes, or none.
fn authorization(
    rng: &mut SmallRng,
    valid: Option<&str>,
) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let valid = valid?;
    let text = match rng.random_range(0..10) {
        0..=6 => format!("Bearer {valid}"),
        7 => return None,
        8 => {
            let mut bytes = format!("Bearer {valid}").into_bytes();
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random_range(0x21..0x7f);
            String::from_utf8(bytes).unwrap_or_default()
        }
        _ => (0..rng.random_range(0..64))
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect(),
    };
    text.parse().ok()
}

/// Sends `requests` fuzzed requests to `targets` over `channel` (seeded: a seed replays a
/// run), each with `token` or a variation of it when one is given.
pub async fn run(
    channel: Channel,
    targets: &[Target],
    requests: u64,
    seed: u64,
    token: Option<&str>,
) -> Report {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut report = Report::default();
    for _ in 0..requests {
        let target = &targets[rng.random_range(0..targets.len())];
        let seed_bytes = (!target.seeds.is_empty())
            .then(|| target.seeds[rng.random_range(0..target.seeds.len())].as_slice());
        let body = Bytes::from(mutate(&mut rng, seed_bytes));
        let mut request = tonic::Request::new(body);
        request.set_timeout(Duration::from_secs(2));
        if let Some(value) = authorization(&mut rng, token) {
            request.metadata_mut().insert("authorization", value);
        }
        let code = send(channel.clone(), target, request, &mut report).await;
        report.requests += 1;
        *report.codes.entry(code).or_default() += 1;
    }
    report
}

async fn send(
    channel: Channel,
    target: &Target,
    request: tonic::Request<Bytes>,
    report: &mut Report,
) -> String {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return "transport".into();
    }
    let path = http::uri::PathAndQuery::from_static(target.path);
    if target.server_streaming {
        return match grpc.server_streaming(request, path, RawCodec).await {
            Ok(mut stream) => {
                // The first message (the current view) or the refusal, then hang up.
                let first =
                    tokio::time::timeout(Duration::from_millis(200), stream.get_mut().message())
                        .await;
                match first {
                    Ok(Err(status)) => shop_shared::metrics::code_name(status.code()).to_string(),
                    _ => "OK".into(),
                }
            }
            Err(status) => shop_shared::metrics::code_name(status.code()).to_string(),
        };
    }
    match grpc.unary(request, path, RawCodec).await {
        Ok(response) => {
            if target.path.starts_with("/shop.v1.CommandService/") {
                use prost::Message;
                if let Ok(result) = pb::CommandResult::decode(response.into_inner()) {
                    report.accepted.push(result);
                }
            }
            "OK".into()
        }
        Err(status) => shop_shared::metrics::code_name(status.code()).to_string(),
    }
}
