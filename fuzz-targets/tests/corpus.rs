//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`) and the regression inputs
//! (`fuzz/regressions/TARGET/`) through the fuzz targets, on stable Rust, so that what
//! libFuzzer once found or covered stays fixed. Also writes the seed corpus (ignored test).

use std::path::{Path, PathBuf};

use shop_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_and_regressions_pass_every_target() {
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            corpus.len() >= 10,
            "fuzz/corpus/{name} holds {} inputs; run the seed writer (see fuzz/README.md)",
            corpus.len()
        );
        let regressions = inputs(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("corpus file reads");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

/// Writes the seed inputs into `fuzz/corpus/TARGET/seed-N` (libFuzzer grows the corpus
/// from them): `cargo test -p shop-fuzz-targets --test corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the seeds change"]
fn write_seed_corpus() {
    for (name, inputs) in seeds::all() {
        let dir = fuzz_dir().join("corpus").join(name);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        for (i, input) in inputs.iter().enumerate() {
            (TARGETS
                .iter()
                .find(|(n, _)| *n == name)
                .expect("a target")
                .1)(input);
            std::fs::write(dir.join(format!("seed-{i:02}")), input).expect("seed written");
        }
    }
}

mod seeds {
    use command_server::domain::testing::Memory;
    use command_server::domain::{Command, LineRequest};
    use command_server::log::{CommitRecord, IndexRow};
    use prost::Message;
    use query_server::paging::encode_token;
    use shop_fuzz_targets::chunk;
    use shop_shared::events::{event_type, stream_of, timestamp_from_micros};
    use shop_shared::pb;

    pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        let envelopes = envelopes();
        vec![
            ("command", commands()),
            ("envelope", envelope_inputs(&envelopes)),
            ("as_of_history", as_of_inputs(&envelopes)),
            ("page_token", page_tokens()),
            ("auth_header", auth_headers()),
            ("tokens_file", tokens_files()),
        ]
    }

    fn line(sku: &str, quantity: i64) -> pb::OrderLineRequest {
        pb::OrderLineRequest {
            sku: sku.into(),
            quantity,
        }
    }

    /// A shop's life as (RPC number, request) pairs: the order of `COMMAND_RPCS`.
    fn requests() -> Vec<(u8, Vec<u8>)> {
        vec![
            (
                0,
                pb::RegisterCustomerRequest {
                    command_id: "k1".into(),
                    customer_id: "c1".into(),
                    name: "Ann Lee".into(),
                    email: "ann@example.com".into(),
                    address: "1 Road".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                4,
                pb::CreateProductRequest {
                    sku: "p1".into(),
                    name: "Pen".into(),
                    price_cents: 250,
                    initial_stock: 10,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                4,
                pb::CreateProductRequest {
                    sku: "p2".into(),
                    name: "Ink".into(),
                    price_cents: 900,
                    initial_stock: 1,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                7,
                pb::PlaceOrderRequest {
                    order_id: "o1".into(),
                    customer_id: "c1".into(),
                    lines: vec![line("p1", 2), line("p2", 1)],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                8,
                pb::PayOrderRequest {
                    order_id: "o1".into(),
                    amount_cents: 1400,
                    payment_ref: "pay-1".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                9,
                pb::ShipOrderRequest {
                    order_id: "o1".into(),
                    tracking: "T1".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                7,
                pb::PlaceOrderRequest {
                    order_id: "o2".into(),
                    customer_id: "c1".into(),
                    lines: vec![line("p1", 3)],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                10,
                pb::CancelOrderRequest {
                    order_id: "o2".into(),
                    reason: "changed mind".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                5,
                pb::RestockProductRequest {
                    sku: "p2".into(),
                    quantity: 5,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                6,
                pb::ChangeProductPriceRequest {
                    sku: "p2".into(),
                    price_cents: 950,
                    expected_version: Some(2),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                1,
                pb::RenameCustomerRequest {
                    customer_id: "c1".into(),
                    name: "Ann Smith".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                2,
                pb::ChangeCustomerAddressRequest {
                    customer_id: "c1".into(),
                    address: "2 Street".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                3,
                pb::DeleteCustomerRequest {
                    customer_id: "c1".into(),
                    reason: "asked".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ]
    }

    fn commands() -> Vec<Vec<u8>> {
        let requests = requests();
        let mut inputs: Vec<Vec<u8>> = requests
            .iter()
            .map(|(rpc, body)| chunk(*rpc, body))
            .collect();
        inputs.push(
            requests
                .iter()
                .flat_map(|(rpc, body)| chunk(*rpc, body))
                .collect(),
        );
        inputs.push(chunk(0, b"\x0a\x03k 1\x12\x00\x1a\x03A\x00B\x22\x01@"));
        inputs
    }

    /// The events of the shop's life, decided by the domain, in envelopes.
    fn envelopes() -> Vec<pb::EventEnvelope> {
        let commands = [
            Command::RegisterCustomer {
                customer_id: "c1".into(),
                name: "Ann Lee".into(),
                email: "ann@example.com".into(),
                address: String::new(),
            },
            Command::CreateProduct {
                sku: "p1".into(),
                name: "Pen".into(),
                price_cents: 250,
                initial_stock: 10,
            },
            Command::PlaceOrder {
                order_id: "o1".into(),
                customer_id: "c1".into(),
                lines: vec![LineRequest {
                    sku: "p1".into(),
                    quantity: 2,
                }],
            },
            Command::PayOrder {
                order_id: "o1".into(),
                amount_cents: 500,
                payment_ref: "pay-1".into(),
            },
            Command::RenameCustomer {
                customer_id: "c1".into(),
                name: "Ann Smith".into(),
            },
            Command::CancelOrder {
                order_id: "o1".into(),
                reason: "late".into(),
            },
        ];
        let mut memory = Memory::default();
        let mut versions = std::collections::HashMap::new();
        let mut out = Vec::new();
        for command in commands {
            for kind in memory
                .when(command.clone())
                .expect("the seed life is valid")
            {
                let stream = stream_of(&kind).to_string();
                let version = versions.entry(stream.clone()).or_insert(0);
                *version += 1;
                let position = out.len() as u64 + 1;
                out.push(pb::EventEnvelope {
                    event_id: format!("e{position}"),
                    position,
                    stream_id: stream,
                    stream_version: *version,
                    event_type: event_type(&kind).into(),
                    occurred_at: Some(timestamp_from_micros(
                        1_700_000_000_000_000 + position as i64 * 1_000,
                    )),
                    command_id: format!("{}-{position}", command.name()),
                    correlation_id: "corr".into(),
                    causation_id: "cause".into(),
                    actor: "fuzz-writer".into(),
                    event: Some(pb::Event { kind: Some(kind) }),
                    ..Default::default()
                });
            }
        }
        out
    }

    fn envelope_inputs(envelopes: &[pb::EventEnvelope]) -> Vec<Vec<u8>> {
        let mut inputs: Vec<Vec<u8>> = envelopes.iter().map(Message::encode_to_vec).collect();
        inputs.push(
            CommitRecord {
                envelopes: envelopes.iter().map(|e| e.encode_to_vec().into()).collect(),
                commands: Vec::new(),
                index_rows: vec![
                    IndexRow {
                        key: b"Ea@shop.test".to_vec(),
                        value: Some(b"c1".to_vec()),
                    },
                    IndexRow {
                        key: b"Oc1\0o1".to_vec(),
                        value: None,
                    },
                ],
            }
            .encode_to_vec(),
        );
        inputs
    }

    fn as_of_inputs(envelopes: &[pb::EventEnvelope]) -> Vec<Vec<u8>> {
        let events: Vec<u8> = envelopes
            .iter()
            .flat_map(|e| chunk(1, &e.encode_to_vec()))
            .collect();
        let mut inputs = Vec::new();
        for position in 1..=envelopes.len() as u64 {
            let request = pb::GetOrderRequest {
                order_id: "o1".into(),
                as_of_position: position,
                ..Default::default()
            };
            let mut input = chunk(0, &request.encode_to_vec());
            input.extend(&events);
            inputs.push(input);
        }
        let request = pb::GetOrderRequest {
            order_id: "o1".into(),
            as_of_time: Some(timestamp_from_micros(1_700_000_000_003_000)),
            ..Default::default()
        };
        let mut input = chunk(0, &request.encode_to_vec());
        input.extend(&events);
        inputs.push(input);
        inputs
    }

    fn page_tokens() -> Vec<Vec<u8>> {
        let filters = [
            "orders|||0",
            "orders|c1|0",
            "orders||3",
            "customers|ann|false",
            "products|max_available=5",
            "products|all",
        ];
        let keys: [&[u8]; 6] = [
            b"xao1",
            b"xcc1\0o1",
            b"xs\x03o1",
            b"xnann\0c1",
            b"xp\x80\0\0\0\0\0\0\x05p1",
            b"pp1",
        ];
        let mut inputs = Vec::new();
        for (i, (filter, key)) in filters.iter().zip(keys).enumerate() {
            for token in [
                encode_token(key, filter),
                String::new(),
                "not-a-token".into(),
            ] {
                let mut input = vec![i as u8];
                input.extend_from_slice(filter.as_bytes());
                input.push(0);
                input.extend_from_slice(token.as_bytes());
                inputs.push(input);
            }
        }
        inputs
    }

    fn expired_jwt() -> String {
        const PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIObAdl8qWUpR5ZhcZz1a6yjXJKJu9W4OTMTyLjIR7XC0\n-----END PRIVATE KEY-----\n";
        #[derive(serde::Serialize)]
        struct Claims {
            sub: &'static str,
            exp: u64,
            roles: Vec<&'static str>,
        }
        let key =
            jsonwebtoken::EncodingKey::from_ed_pem(PRIVATE_PEM.as_bytes()).expect("the seed key");
        let claims = Claims {
            sub: "fuzz-jwt",
            exp: 1_000_000,
            roles: vec!["writer", "reader"],
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &key,
        )
        .expect("a JWT")
    }

    fn auth_headers() -> Vec<Vec<u8>> {
        let known = format!("Bearer {}", shop_fuzz_targets::KNOWN_TOKEN);
        let jwt = format!("Bearer {}", expired_jwt());
        let mut inputs: Vec<Vec<u8>> = [
            known.as_str(),
            "bearer fuzz-token-0123456788",
            "Basic Zm9vOmJhcg==",
            jwt.as_str(),
            "Bearer a.b.c",
            "Bearer ",
            "Bearer  x",
        ]
        .iter()
        .map(|h| chunk(0, h.as_bytes()))
        .collect();
        inputs.push(chunk(1, b"CN=fuzz-reader"));
        inputs.push([chunk(0, known.as_bytes()), chunk(0, known.as_bytes())].concat());
        inputs.push([chunk(1, b"CN=someone"), chunk(0, known.as_bytes())].concat());
        inputs
    }

    fn tokens_files() -> Vec<Vec<u8>> {
        [
            "writer f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c fuzz-writer\nreader cert:CN=fuzz-reader\n",
            "# comment\n\nadmin 0000000000000000000000000000000000000000000000000000000000000000 ops\n",
            "reader,writer f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c\n",
            "writer nothex\n",
            "root f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c x\n",
            "reader cert:CN=a,O=b\nwriter cert:\n",
            "writer F7726601E6CCB0A36DB335CE6BC4BEFFBA2C9C5C561747D8BC2364155B27C77C  two  spaces\n",
            "\r\nwriter\tf7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c\r\n",
            "admin f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c a b c\n",
            "reader f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c\nreader f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c\n",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect()
    }
}
