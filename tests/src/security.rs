//! Security fixtures: a throwaway PKI (made with rcgen when a test runs: no private key is
//! committed), tokens files, signed JWTs, requests that carry a bearer token, and a NATS
//! configuration with one user per server.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate authority and the certificates it issued, as PEM files in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Pki {
    /// A new CA (`ca.pem`) and a server certificate for `127.0.0.1` and `localhost`
    /// (`server.pem`, `server-key.pem`).
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("shop-pki-")
            .tempdir()
            .expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "shop test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca.pem");
        let pki = Pki { dir, ca };
        pki.issue(
            "server",
            &["127.0.0.1", "localhost"],
            "shop server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki
    }

    /// A file of this PKI (`ca.pem`, `server.pem`, `client-NAME-key.pem`, ...).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn issue(&self, name: &str, sans: &[&str], common_name: &str, usage: ExtendedKeyUsagePurpose) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem())
            .expect("write key");
    }

    /// Issues a client certificate with subject `CN=common_name` (files
    /// `client-<common_name>.pem` and `-key.pem`) and returns it as a tonic identity.
    pub fn client_identity(&self, common_name: &str) -> Identity {
        let name = format!("client-{common_name}");
        if !self.path(&format!("{name}.pem")).exists() {
            self.issue(&name, &[], common_name, ExtendedKeyUsagePurpose::ClientAuth);
        }
        Identity::from_pem(
            std::fs::read(self.path(&format!("{name}.pem"))).expect("client cert"),
            std::fs::read(self.path(&format!("{name}-key.pem"))).expect("client key"),
        )
    }

    /// The server flags: TLS with the server certificate, and mTLS against this CA.
    pub fn server_args(&self, mtls: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            self.path("server.pem").display().to_string(),
            "--tls-key".to_string(),
            self.path("server-key.pem").display().to_string(),
        ];
        if mtls {
            args.push("--tls-client-ca".into());
            args.push(self.path("ca.pem").display().to_string());
        }
        args
    }

    /// A client configuration that trusts this CA, presenting `identity` if given.
    pub fn client_tls(&self, identity: Option<Identity>) -> ClientTlsConfig {
        let ca = Certificate::from_pem(std::fs::read(self.path("ca.pem")).expect("ca.pem"));
        let config = ClientTlsConfig::new().ca_certificate(ca);
        match identity {
            Some(identity) => config.identity(identity),
            None => config,
        }
    }
}

/// The hex SHA-256 of a token, as the tokens file holds it (computed here, not by the
/// server's code, so a wrong hash on either side fails the tests).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a tokens file: `(role, token, name)` entries and `(role, subject)` certificate
/// entries.
pub fn write_tokens(path: &Path, tokens: &[(&str, &str, &str)], subjects: &[(&str, &str)]) {
    let mut text = String::from("# ROLE SHA256_HEX_OF_TOKEN [NAME]\n");
    for (role, token, name) in tokens {
        text.push_str(&format!("{role} {} {name}\n", sha256_hex(token)));
    }
    for (role, subject) in subjects {
        text.push_str(&format!("{role} cert:{subject}\n"));
    }
    std::fs::write(path, text).expect("write tokens file");
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("ascii token");
    request.metadata_mut().insert("authorization", value);
    request
}

/// A JWT signing key and its public key file for `--auth-jwt-key`.
pub struct JwtKeys {
    pub public_key_path: PathBuf,
    encoding: jsonwebtoken::EncodingKey,
    algorithm: jsonwebtoken::Algorithm,
    _dir: tempfile::TempDir,
}

impl JwtKeys {
    /// An Ed25519 key pair (EdDSA).
    pub fn ed25519() -> JwtKeys {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
        JwtKeys::new(
            key.public_key_pem(),
            jsonwebtoken::EncodingKey::from_ed_pem(key.serialize_pem().as_bytes())
                .expect("ed25519 encoding key"),
            jsonwebtoken::Algorithm::EdDSA,
        )
    }

    /// A 2048-bit RSA key pair (RS256).
    pub fn rsa() -> JwtKeys {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePublicKey;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .expect("public pem");
        let private_pem = private
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("private pem");
        JwtKeys::new(
            public_pem,
            jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes())
                .expect("rsa encoding key"),
            jsonwebtoken::Algorithm::RS256,
        )
    }

    fn new(
        public_pem: String,
        encoding: jsonwebtoken::EncodingKey,
        algorithm: jsonwebtoken::Algorithm,
    ) -> JwtKeys {
        let dir = tempfile::tempdir().expect("tempdir");
        let public_key_path = dir.path().join("jwt-public.pem");
        std::fs::write(&public_key_path, public_pem).expect("write public key");
        JwtKeys {
            public_key_path,
            encoding,
            algorithm,
            _dir: dir,
        }
    }

    /// A token with these claims, signed with this key.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(self.algorithm),
            claims,
            &self.encoding,
        )
        .expect("sign jwt")
    }

    /// Claims `sub`, `roles`, and `exp` `expires_in_s` seconds from now (negative: past).
    pub fn claims(sub: &str, roles: &[&str], expires_in_s: i64) -> serde_json::Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        serde_json::json!({ "sub": sub, "roles": roles, "exp": now + expires_in_s })
    }
}

/// The nats-server configuration of `scripts/nats-users.conf.in` (the one the README
/// shows): user `command` may publish events and manage the stream, user `query` may only
/// read it. With `tls`, the server serves TLS with the PKI's server certificate.
pub fn nats_users_config(
    command_password: &str,
    query_password: &str,
    tls: Option<&Pki>,
) -> String {
    let template =
        std::fs::read_to_string(crate::workspace_root().join("scripts/nats-users.conf.in"))
            .expect("scripts/nats-users.conf.in");
    let tls_block = tls.map_or(String::new(), |pki| {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}",
            pki.path("server.pem").display(),
            pki.path("server-key.pem").display()
        )
    });
    template
        .replace("@TLS@", &tls_block)
        .replace("@COMMAND_PASSWORD@", command_password)
        .replace("@QUERY_PASSWORD@", query_password)
}

/// A NATS operator with one account (JetStream on) whose users get credentials files:
/// the decentralised authentication of `nsc`, made here with nkeys (a test needs no
/// `nsc` binary). The server runs in operator mode with the account preloaded.
pub struct NatsOperator {
    operator: nkeys::KeyPair,
    account: nkeys::KeyPair,
    /// JetStream in operator mode needs a system account.
    system: nkeys::KeyPair,
    dir: tempfile::TempDir,
}

impl Default for NatsOperator {
    fn default() -> Self {
        NatsOperator::new()
    }
}

impl NatsOperator {
    pub fn new() -> NatsOperator {
        NatsOperator {
            operator: nkeys::KeyPair::new_operator(),
            account: nkeys::KeyPair::new_account(),
            system: nkeys::KeyPair::new_account(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A NATS JWT (`ed25519-nkey`) with these claims, signed by `issuer`.
    fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let iat = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = serde_json::json!({
            "jti": format!("{:X}", Sha256::digest(format!("{subject}{iat}{name}").as_bytes()))[..52].to_string(),
            "iat": iat,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let signature = issuer.sign(signed.as_bytes()).expect("sign");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The nats-server configuration: operator mode, the account preloaded.
    pub fn server_config(&self) -> String {
        let operator = Self::jwt(
            &self.operator,
            &self.operator.public_key(),
            "shop-operator",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let account = Self::jwt(
            &self.operator,
            &self.account.public_key(),
            "shop",
            serde_json::json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2
            }),
        );
        let system = Self::jwt(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            serde_json::json!({"limits": {"subs": -1, "data": -1, "payload": -1, "conn": -1},
                "type": "account", "version": 2}),
        );
        format!(
            "operator: {operator}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acc}: {account}\n  {sys}: {system}\n}}\n",
            acc = self.account.public_key(),
            sys = self.system.public_key(),
        )
    }

    /// Writes a credentials file for a new user of the account with these permissions;
    /// its path.
    pub fn user_creds(&self, name: &str, permissions: &NatsPermissions) -> PathBuf {
        let user = nkeys::KeyPair::new_user();
        let jwt = Self::jwt(
            &self.account,
            &user.public_key(),
            name,
            serde_json::json!({
                "pub": {"allow": permissions.publish_allow, "deny": permissions.publish_deny},
                "sub": {"allow": permissions.subscribe_allow},
                "subs": -1, "data": -1, "payload": -1,
                "type": "user",
                "version": 2
            }),
        );
        let seed = user.seed().expect("seed");
        let path = self.dir.path().join(format!("{name}.creds"));
        std::fs::write(
            &path,
            format!(
                "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .expect("write creds");
        path
    }
}

/// What a NATS user may do: allow and deny lists of subjects.
#[derive(Debug, Clone, Default)]
pub struct NatsPermissions {
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
}

/// The permissions of `user` in `scripts/nats-users.conf.in`, so that a credentials-file
/// test grants exactly what the documented configuration does.
pub fn nats_user_permissions(user: &str) -> NatsPermissions {
    let template =
        std::fs::read_to_string(crate::workspace_root().join("scripts/nats-users.conf.in"))
            .expect("scripts/nats-users.conf.in");
    let block = template
        .split("user: ")
        .find(|b| b.starts_with(user))
        .unwrap_or_else(|| panic!("no user {user} in nats-users.conf.in"));
    let (publish, subscribe) = block
        .split_once("subscribe:")
        .unwrap_or_else(|| panic!("no subscribe permissions for {user}"));
    // The quoted subjects of the `[...]` list after `key` in `text` (none without `key`).
    let list = |text: &str, key: &str| -> Vec<String> {
        let Some(start) = text.find(key) else {
            return Vec::new();
        };
        let rest = &text[start + key.len()..];
        let rest = &rest[rest.find('[').map_or(rest.len(), |i| i + 1)..];
        let body = &rest[..rest.find(']').unwrap_or(rest.len())];
        body.split('"')
            .skip(1)
            .step_by(2)
            .map(ToString::to_string)
            .collect()
    };
    NatsPermissions {
        publish_allow: list(publish, "allow:"),
        publish_deny: list(publish, "deny:"),
        subscribe_allow: list(subscribe, "allow:"),
    }
}
