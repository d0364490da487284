//! `auth_header`: the authentication layer's decision on arbitrary credentials.
//! `tokens_file`: the tokens file parser.

use std::sync::OnceLock;

use shop_shared::auth::{bearer_token, Authenticator, Role, Tokens};

use crate::chunks;

/// The one token the fuzzed authenticator knows (a writer named `fuzz-writer`).
pub const KNOWN_TOKEN: &str = "fuzz-token-0123456789";
const TOKENS_FILE: &str =
    "writer f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c fuzz-writer\n\
                           reader cert:CN=fuzz-reader\n";
/// The Ed25519 public key the fuzzed authenticator verifies JWTs with. Its private key is
/// in the seed generator (`tests/corpus.rs`), which signs only expired tokens.
pub const JWT_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAUqBbd+3vw9rnQJNiTxWJyrR8iz/0arzJMEj2A0jf078=
-----END PUBLIC KEY-----
";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let tokens = Tokens::parse(TOKENS_FILE).expect("the fuzz tokens file parses");
        Authenticator::in_memory(tokens, Some(JWT_PUBLIC_PEM.as_bytes()))
            .expect("the fuzz JWT key loads")
    })
}

/// Input: chunks; tag 0 bodies are `authorization` header values (one or several), a
/// tag 1 body is the client certificate's subject. Only the known token, or a
/// certificate subject when no header is sent, may be let in.
pub fn auth_header(data: &[u8]) {
    let mut headers = http::HeaderMap::new();
    let mut subject = None;
    let mut sent = Vec::new();
    for (tag, body) in chunks(data) {
        if tag % 2 == 0 {
            if let Ok(value) = http::HeaderValue::from_bytes(body) {
                headers.append(http::header::AUTHORIZATION, value);
                sent.push(body);
            }
        } else {
            subject = Some(String::from_utf8_lossy(body).into_owned());
        }
    }
    let verdict = authenticator().authenticate(&headers, || subject.clone());
    let Ok(principal) = verdict else {
        return;
    };
    match sent.as_slice() {
        [] => {
            assert_eq!(Some(&principal.name), subject.as_ref());
            let expected = subject.as_deref() == Some("CN=fuzz-reader");
            assert_eq!(principal.roles.allow(Role::Reader), expected);
            assert!(!principal.roles.allow(Role::Writer));
        }
        [value] => {
            assert_eq!(
                bearer_token(value),
                Some(KNOWN_TOKEN),
                "let in without the token"
            );
            assert_eq!(principal.name, "fuzz-writer");
            assert!(principal.roles.allow(Role::Writer));
        }
        _ => panic!("let in with {} authorization headers", sent.len()),
    }
}

/// Input: the text of a tokens file. A file that parses lets in exactly the tokens whose
/// hashes it lists: the known token only if its hash is there, and always once a line
/// with it is appended.
pub fn tokens_file(data: &[u8]) {
    const KNOWN_HASH: &str = "f7726601e6ccb0a36db335ce6bc4beffba2c9c5c561747d8bc2364155b27c77c";
    let text = String::from_utf8_lossy(data);
    let Ok(tokens) = Tokens::parse(&text) else {
        return;
    };
    let (token_count, subject_count) = tokens.len();
    assert!(token_count + subject_count <= text.lines().count());
    if !text.to_ascii_lowercase().contains(KNOWN_HASH) {
        assert!(
            tokens.find(KNOWN_TOKEN).is_none(),
            "a token it does not list"
        );
    }
    assert!(tokens.find("").is_none());
    let extended = format!("{text}\nadmin {KNOWN_HASH} fuzz-admin\n");
    if let Ok(tokens) = Tokens::parse(&extended) {
        assert!(
            tokens.find(KNOWN_TOKEN).is_some(),
            "a listed token is refused"
        );
    }
}
