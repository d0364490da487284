//! Authentication and roles (README: Running securely), one tower layer both servers put in front
//! of every service. Who may call what is decided by the RPC path alone ([`access_of`]);
//! who the caller is comes from, in this order: an `authorization: Bearer` token (a JWT
//! when `--auth-jwt-key` is set and the token has JWT shape, else a static token from
//! `--auth-tokens`), or the client certificate's subject under mTLS (mapped to roles in
//! the tokens file). The authenticated [`Principal`] is put in the request's extensions,
//! where handlers find it (the command server records it as the events' `actor`).
//!
//! Tokens are never logged and never kept: the file holds their SHA-256, a presented token
//! is hashed and compared with every entry in constant time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Code;

use crate::grpc::with_reason;

/// Longest `authorization` header value looked at; longer ones are refused unread.
pub const AUTHORIZATION_BYTES_MAX: usize = 8 * 1024;
/// Prefix of a tokens-file entry that names a client certificate subject instead of a
/// token hash: `writer cert:CN=orders-svc,O=Shop`.
pub const CERT_ENTRY_PREFIX: &str = "cert:";
/// Clock skew tolerated on a JWT's `exp`, in seconds.
const JWT_LEEWAY_S: u64 = 5;
/// Verified JWTs remembered (by their SHA-256) so that a client reusing its token pays
/// for one signature check, not one per request; the cache is emptied when full.
const JWT_CACHE_ENTRIES_MAX: usize = 4096;

/// A role: what a principal may call (README: Running securely).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May call `CommandService`.
    Writer,
    /// May call `QueryService` and the read RPCs of `LogService`.
    Reader,
    /// May call everything.
    Admin,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "writer" => Some(Role::Writer),
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Writer => 1,
            Role::Reader => 2,
            Role::Admin => 4,
        }
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn with(self, role: Role) -> Roles {
        Roles(self.0 | role.bit())
    }

    /// Whether these roles may do what `role` may: `admin` may do everything.
    pub fn allow(self, role: Role) -> bool {
        self.0 & (role.bit() | Role::Admin.bit()) != 0
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        iter.into_iter().fold(Roles::default(), Roles::with)
    }
}

/// Who is calling, once authenticated. In the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's NAME, the JWT's `sub`, or the certificate's subject: the `actor` of
    /// what this principal writes.
    pub name: String,
    pub roles: Roles,
}

/// What an RPC requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without credentials (health, reflection).
    Open,
    /// A principal with this role (or `admin`).
    Requires(Role),
}

/// The access rule of an RPC path (`/package.Service/Method`). Anything not named here
/// (unknown services included) needs `admin`.
pub fn access_of(path: &str) -> Access {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(service, _)| service);
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        "shop.v1.CommandService" => Access::Requires(Role::Writer),
        "shop.v1.QueryService" | "shop.v1.LogService" => Access::Requires(Role::Reader),
        _ => Access::Requires(Role::Admin),
    }
}

/// Why credentials were not accepted, as the client is told (`ErrorInfo.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token and no mapped client certificate.
    MissingCredentials,
    /// The `authorization` header is not `Bearer TOKEN` (or is too long, or repeated).
    MalformedAuthorization,
    /// A static token that is not in the tokens file.
    UnknownToken,
    /// A JWT that does not verify: bad signature, shape, algorithm or claims.
    InvalidJwt,
    /// A JWT past its `exp`.
    ExpiredJwt,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MissingCredentials => "MISSING_CREDENTIALS",
            Refusal::MalformedAuthorization => "MALFORMED_AUTHORIZATION",
            Refusal::UnknownToken => "UNKNOWN_TOKEN",
            Refusal::InvalidJwt => "INVALID_TOKEN",
            Refusal::ExpiredJwt => "TOKEN_EXPIRED",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::MissingCredentials => {
                "authentication required: send `authorization: Bearer TOKEN`"
            }
            Refusal::MalformedAuthorization => {
                "malformed authorization header: expected one `Bearer TOKEN` of at most 8 KiB"
            }
            Refusal::UnknownToken => "unknown token",
            Refusal::InvalidJwt => "invalid token: the JWT does not verify",
            Refusal::ExpiredJwt => "invalid token: the JWT has expired",
        }
    }

    pub fn status(self) -> tonic::Status {
        with_reason(Code::Unauthenticated, self.reason(), self.message(), &[])
    }
}

/// Why the security configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    TokensFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: not a PEM RSA or Ed25519 public key")]
    JwtKey { path: PathBuf },
}

/// One line of the tokens file.
#[derive(Debug, Clone)]
struct TokenEntry {
    hash: [u8; 32],
    principal: Principal,
}

/// The tokens file, parsed: `ROLE SHA256_HEX_OF_TOKEN [NAME]` and
/// `ROLE cert:SUBJECT`; `#` starts a comment. The same token or subject on several lines
/// has all their roles.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<TokenEntry>,
    subjects: HashMap<String, Roles>,
}

impl Tokens {
    /// Parses the file's text; the error names the line.
    pub fn parse(text: &str) -> Result<Tokens, (usize, String)> {
        let mut parsed = Tokens::default();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            parsed
                .add_line(line)
                .map_err(|reason| (index + 1, reason))?;
        }
        Ok(parsed)
    }

    fn add_line(&mut self, line: &str) -> Result<(), String> {
        let (role, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let role = Role::parse(role)
            .ok_or_else(|| format!("unknown role {role:?} (writer, reader or admin)"))?;
        let rest = rest.trim();
        if let Some(subject) = rest.strip_prefix(CERT_ENTRY_PREFIX) {
            let subject = subject.trim();
            if subject.is_empty() {
                return Err("empty certificate subject".into());
            }
            let roles = self.subjects.entry(subject.to_string()).or_default();
            *roles = roles.with(role);
            return Ok(());
        }
        let mut fields = rest.split_whitespace();
        let hash = fields
            .next()
            .and_then(parse_sha256_hex)
            .ok_or("expected the token's SHA-256 as 64 hex digits")?;
        let name = fields
            .next()
            .map_or_else(|| format!("token-{}", hex(&hash[..4])), ToString::to_string);
        if fields.next().is_some() {
            return Err("expected `ROLE SHA256_HEX [NAME]`".into());
        }
        match self.tokens.iter_mut().find(|t| t.hash == hash) {
            Some(entry) => entry.principal.roles = entry.principal.roles.with(role),
            None => self.tokens.push(TokenEntry {
                hash,
                principal: Principal {
                    name,
                    roles: Roles::default().with(role),
                },
            }),
        }
        Ok(())
    }

    /// The principal of `token`. Every entry is compared, in constant time, whether or
    /// not an earlier one matched: timing says nothing about which hashes are stored.
    pub fn find(&self, token: &str) -> Option<&Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.tokens {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(&entry.principal);
            }
        }
        found
    }

    /// Roles of a client certificate subject, when the file names it.
    pub fn subject_roles(&self, subject: &str) -> Option<Roles> {
        self.subjects.get(subject).copied()
    }

    /// Entries, for the log line of a (re)load (counts, never tokens).
    pub fn len(&self) -> (usize, usize) {
        (self.tokens.len(), self.subjects.len())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// JWT verification with one public key.
struct Jwt {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
    /// SHA-256 of a verified token → its principal and `exp`. The key never changes
    /// while the process runs, so a token verified once stays valid until `exp`.
    verified: Mutex<HashMap<[u8; 32], (Principal, u64)>>,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    roles: Vec<String>,
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Jwt {
    fn load(path: &Path) -> Result<Jwt, AuthError> {
        let pem = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Jwt::from_pem(&pem).ok_or_else(|| AuthError::JwtKey {
            path: path.to_path_buf(),
        })
    }

    /// A verifier for an RSA (RS256) or Ed25519 (EdDSA) public key in PEM.
    fn from_pem(pem: &[u8]) -> Option<Jwt> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let (key, algorithm) = match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => (DecodingKey::from_ed_pem(pem).ok()?, Algorithm::EdDSA),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = JWT_LEEWAY_S;
        validation.validate_aud = false;
        Some(Jwt {
            key,
            validation,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The principal of `token`, from the cache of verified tokens or by verifying it.
    fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((principal, exp)) = verified.get(&hash) {
            if unix_now_s() <= exp.saturating_add(JWT_LEEWAY_S) {
                return Ok(principal.clone());
            }
            verified.remove(&hash);
            return Err(Refusal::ExpiredJwt);
        }
        drop(verified);
        let (principal, exp) = self.verify_signature(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= JWT_CACHE_ENTRIES_MAX {
            verified.clear();
        }
        verified.insert(hash, (principal.clone(), exp));
        Ok(principal)
    }

    fn verify_signature(&self, token: &str) -> Result<(Principal, u64), Refusal> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| match error.kind() {
                ErrorKind::ExpiredSignature => Refusal::ExpiredJwt,
                _ => Refusal::InvalidJwt,
            },
        )?;
        if data.claims.sub.is_empty() {
            return Err(Refusal::InvalidJwt);
        }
        let principal = Principal {
            name: data.claims.sub,
            // Roles this server does not know are someone else's business.
            roles: data
                .claims
                .roles
                .iter()
                .filter_map(|r| Role::parse(r))
                .collect(),
        };
        Ok((principal, data.claims.exp))
    }
}

/// The credentials a server accepts. Cheap to share; the tokens file can be reloaded.
pub struct Authenticator {
    tokens_path: Option<PathBuf>,
    tokens: RwLock<Arc<Tokens>>,
    jwt: Option<Jwt>,
}

impl Authenticator {
    /// Loads the tokens file and the JWT key; `None` when neither is configured (auth off).
    pub fn load(
        tokens_path: Option<&Path>,
        jwt_key: Option<&Path>,
    ) -> Result<Option<Arc<Authenticator>>, AuthError> {
        if tokens_path.is_none() && jwt_key.is_none() {
            return Ok(None);
        }
        let tokens = match tokens_path {
            Some(path) => read_tokens(path)?,
            None => Tokens::default(),
        };
        let jwt = jwt_key.map(Jwt::load).transpose()?;
        let (token_count, subject_count) = tokens.len();
        tracing::info!(
            tokens = token_count,
            certificate_subjects = subject_count,
            jwt = jwt.is_some(),
            "authentication on"
        );
        Ok(Some(Arc::new(Authenticator {
            tokens_path: tokens_path.map(Path::to_path_buf),
            tokens: RwLock::new(Arc::new(tokens)),
            jwt,
        })))
    }

    /// An authenticator from tokens and a JWT public key (PEM) held in memory, not
    /// reloadable; `None` when the key is not an RSA or Ed25519 public key. For the fuzz
    /// targets (`fuzz/`) and tests.
    pub fn in_memory(tokens: Tokens, jwt_public_pem: Option<&[u8]>) -> Option<Authenticator> {
        let jwt = match jwt_public_pem {
            Some(pem) => Some(Jwt::from_pem(pem)?),
            None => None,
        };
        Some(Authenticator {
            tokens_path: None,
            tokens: RwLock::new(Arc::new(tokens)),
            jwt,
        })
    }

    /// Re-reads the tokens file; on error the previous tokens stay in force.
    pub fn reload(&self) -> Result<(usize, usize), AuthError> {
        let Some(path) = &self.tokens_path else {
            return Ok((0, 0));
        };
        let tokens = read_tokens(path)?;
        let counts = tokens.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(counts)
    }

    /// Reloads the tokens file on every SIGHUP until the process ends.
    pub fn reload_on_sighup(self: &Arc<Self>) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let auth = self.clone();
            match signal(SignalKind::hangup()) {
                Ok(mut hangups) => {
                    tokio::spawn(async move {
                        while hangups.recv().await.is_some() {
                            match auth.reload() {
                                Ok((tokens, subjects)) => tracing::info!(
                                    tokens,
                                    certificate_subjects = subjects,
                                    "SIGHUP: tokens file reloaded"
                                ),
                                Err(error) => tracing::error!(
                                    %error,
                                    "SIGHUP: tokens file not reloaded; the previous tokens stay in force"
                                ),
                            }
                        }
                    });
                }
                Err(error) => tracing::error!(%error, "cannot listen for SIGHUP"),
            }
        }
    }

    fn current_tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Who presents these credentials: the `authorization` bearer token if any, else the
    /// client certificate's subject (which may have no roles; only looked for when no
    /// token is sent).
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        certificate_subject: impl FnOnce() -> Option<String>,
    ) -> Result<Principal, Refusal> {
        let mut authorization = headers.get_all(http::header::AUTHORIZATION).iter();
        match (authorization.next(), authorization.next()) {
            (None, _) => {}
            (Some(value), None) => return self.authenticate_bearer(value.as_bytes()),
            (Some(_), Some(_)) => return Err(Refusal::MalformedAuthorization),
        }
        let subject = certificate_subject().ok_or(Refusal::MissingCredentials)?;
        let roles = self
            .current_tokens()
            .subject_roles(&subject)
            .unwrap_or_default();
        Ok(Principal {
            name: subject,
            roles,
        })
    }

    fn authenticate_bearer(&self, value: &[u8]) -> Result<Principal, Refusal> {
        let token = bearer_token(value).ok_or(Refusal::MalformedAuthorization)?;
        if let Some(jwt) = &self.jwt {
            if token.bytes().filter(|b| *b == b'.').count() == 2 {
                return jwt.verify(token);
            }
        }
        self.current_tokens()
            .find(token)
            .cloned()
            .ok_or(Refusal::UnknownToken)
    }
}

fn read_tokens(path: &Path) -> Result<Tokens, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Tokens::parse(&text).map_err(|(line, reason)| AuthError::TokensFile {
        path: path.to_path_buf(),
        line,
        reason,
    })
}

/// The token of `Bearer TOKEN` (scheme case-insensitive, one space, visible ASCII).
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    if value.len() > AUTHORIZATION_BYTES_MAX {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let valid = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_graphic());
    valid.then_some(token)
}

/// The subject of the client certificate of a TLS connection (RFC 4514 text, e.g.
/// `CN=orders-svc,O=Shop`), when the client sent one.
pub fn certificate_subject(extensions: &http::Extensions) -> Option<String> {
    use x509_cert::der::Decode;
    let info = extensions
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>(
        )?;
    let certs = info.peer_certs()?;
    let leaf = certs.first()?;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
    Some(cert.tbs_certificate.subject.to_string())
}

/// The layer: refuses what the caller may not do, else passes the request on with its
/// [`Principal`] in the extensions. Without an [`Authenticator`] it passes everything.
#[derive(Clone, Default)]
pub struct AuthLayer {
    auth: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    pub fn new(auth: Option<Arc<Authenticator>>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

/// What the layer decided about one request.
fn admit(
    auth: &Authenticator,
    request: &http::Request<impl Sized>,
) -> Result<Option<Principal>, tonic::Status> {
    let path = request.uri().path();
    let Access::Requires(role) = access_of(path) else {
        return Ok(None);
    };
    let principal = auth
        .authenticate(request.headers(), || {
            certificate_subject(request.extensions())
        })
        .map_err(|refusal| {
            tracing::debug!(path, reason = refusal.reason(), "request not authenticated");
            refusal.status()
        })?;
    if !principal.roles.allow(role) {
        tracing::debug!(path, principal = %principal.name, role = role.as_str(), "permission denied");
        return Err(with_reason(
            Code::PermissionDenied,
            "MISSING_ROLE",
            format!(
                "{} may not call {path}: it needs the role {} (or admin)",
                principal.name,
                role.as_str()
            ),
            &[("role", role.as_str().to_string())],
        ));
    }
    Ok(Some(principal))
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    /// The refusal, ready at once, or the admitted request (nothing boxed either way).
    type Future =
        futures::future::Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        use futures::future::Either;
        if let Some(auth) = &self.auth {
            match admit(auth, &request) {
                Ok(Some(principal)) => {
                    request.extensions_mut().insert(principal);
                }
                Ok(None) => {}
                Err(status) => return Either::Left(std::future::ready(Ok(status.into_http()))),
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_line(role: &str, token: &str, name: &str) -> String {
        format!("{role} {} {name}\n", hex(&Sha256::digest(token.as_bytes())))
    }

    #[test]
    fn tokens_file_lines() {
        let text = format!(
            "# comment\n\n{}{}{}writer cert:CN=orders-svc, O=Shop  # trailing\n",
            hash_line("writer", "w-token", "orders"),
            hash_line("reader", "w-token", "orders"),
            hash_line("admin", "a-token", ""),
        );
        let tokens = Tokens::parse(&text).expect("parses");
        let writer = tokens.find("w-token").expect("known");
        assert_eq!(writer.name, "orders");
        assert!(writer.roles.allow(Role::Writer) && writer.roles.allow(Role::Reader));
        assert!(!writer.roles.allow(Role::Admin));
        let admin = tokens.find("a-token").expect("known");
        assert!(admin.name.starts_with("token-"));
        assert!(admin.roles.allow(Role::Writer) && admin.roles.allow(Role::Reader));
        assert!(tokens.find("w-token ").is_none());
        assert!(tokens.find("").is_none());
        let roles = tokens
            .subject_roles("CN=orders-svc, O=Shop")
            .expect("mapped");
        assert!(roles.allow(Role::Writer) && !roles.allow(Role::Reader));
    }

    #[test]
    fn tokens_file_errors_name_the_line() {
        assert_eq!(Tokens::parse("\nroot abc").map(|_| ()).unwrap_err().0, 2);
        assert!(Tokens::parse("writer abc").is_err());
        assert!(Tokens::parse(&format!("writer {} a b", "0".repeat(64))).is_err());
        assert!(Tokens::parse("writer cert:").is_err());
        assert!(Tokens::parse(&format!("writer {}", "g".repeat(64))).is_err());
    }

    #[test]
    fn access_rules() {
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access_of("/shop.v1.CommandService/PlaceOrder"),
            Access::Requires(Role::Writer)
        );
        assert_eq!(
            access_of("/shop.v1.LogService/ReadLog"),
            Access::Requires(Role::Reader)
        );
        assert_eq!(
            access_of("/shop.v1.QueryService/GetOrder"),
            Access::Requires(Role::Reader)
        );
        assert_eq!(access_of("/x.Y/Z"), Access::Requires(Role::Admin));
        assert_eq!(access_of("garbage"), Access::Requires(Role::Admin));
    }

    #[test]
    fn bearer_header_syntax() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"Bearer  abc"), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"abc"), None);
        assert_eq!(bearer_token(b"Bearer a\xffb"), None);
        let long = format!("Bearer {}", "a".repeat(AUTHORIZATION_BYTES_MAX));
        assert_eq!(bearer_token(long.as_bytes()), None);
    }

    fn hs256() -> (Jwt, jsonwebtoken::EncodingKey) {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = JWT_LEEWAY_S;
        let jwt = Jwt {
            key: jsonwebtoken::DecodingKey::from_secret(b"test secret"),
            validation,
            verified: Mutex::new(HashMap::new()),
        };
        (jwt, jsonwebtoken::EncodingKey::from_secret(b"test secret"))
    }

    fn sign(key: &jsonwebtoken::EncodingKey, sub: &str, exp: u64) -> String {
        let claims = serde_json::json!({"sub": sub, "exp": exp, "roles": ["writer", "owner"]});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key).expect("sign")
    }

    #[test]
    fn verified_jwts_are_cached_until_they_expire() {
        let (jwt, key) = hs256();
        let token = sign(&key, "alice", unix_now_s() + 100);
        let first = jwt.verify(&token).expect("valid");
        assert_eq!(first.name, "alice");
        assert!(first.roles.allow(Role::Writer) && !first.roles.allow(Role::Reader));
        assert_eq!(jwt.verify(&token), Ok(first));
        assert_eq!(jwt.verified.lock().expect("lock").len(), 1);
        // Once past its exp (and the leeway) the cached token is refused and forgotten.
        for entry in jwt.verified.lock().expect("lock").values_mut() {
            entry.1 = unix_now_s() - JWT_LEEWAY_S - 1;
        }
        assert_eq!(jwt.verify(&token), Err(Refusal::ExpiredJwt));
        assert!(jwt.verified.lock().expect("lock").is_empty());
        // What does not verify is never cached.
        let tampered = format!("{token}x");
        assert_eq!(jwt.verify(&tampered), Err(Refusal::InvalidJwt));
        let expired = sign(&key, "bob", unix_now_s() - 3600);
        assert_eq!(jwt.verify(&expired), Err(Refusal::ExpiredJwt));
        assert!(jwt.verified.lock().expect("lock").is_empty());
    }

    #[test]
    fn jwt_cache_is_bounded() {
        let (jwt, key) = hs256();
        let exp = unix_now_s() + 100;
        for i in 0..=JWT_CACHE_ENTRIES_MAX {
            jwt.verify(&sign(&key, &format!("u{i}"), exp))
                .expect("valid");
        }
        assert!(jwt.verified.lock().expect("lock").len() <= JWT_CACHE_ENTRIES_MAX);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = bearer_token(&bytes);
            let _ = Tokens::parse(&String::from_utf8_lossy(&bytes));
            let _ = access_of(&String::from_utf8_lossy(&bytes));
        }
    }
}
