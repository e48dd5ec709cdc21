//! Who is calling: bearer tokens, each naming an identity with a role.
//!
//! `--tokens FILE` holds one `name token role` line per identity (`#` starts a
//! comment); roles are `client` (submits and follows its own runs), `worker`
//! (the worker service only) and `admin` (everything, every run). A single
//! `DPO_TOKEN` is the shorthand for one admin named `admin`. Without any token
//! (loopback only) every caller is that admin.
//!
//! Every gRPC service sits behind a [`Gate`] that identifies the caller (one
//! constant-time comparison with every token, whichever matches), checks the
//! role against the service and hands the [`Identity`] to the handler in the
//! request's extensions.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::engine::constant_time_eq;

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits runs and sees, watches and cancels its own.
    Client,
    /// Calls the worker service.
    Worker,
    /// Everything, on every run.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// A caller, as its token named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// The identity of every caller when no token is configured.
    pub fn anonymous_admin() -> Self {
        Identity {
            name: "admin".into(),
            role: Role::Admin,
        }
    }

    /// The owner whose runs this caller may see: `None` for an admin (all).
    pub fn owner_filter(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(self.name.as_str())
    }
}

/// A tokens file that cannot be used; names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: no tokens")]
    Empty { path: String },
}

/// The known tokens (none: authentication is off).
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Identity, Vec<u8>)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.entries.iter().map(|(i, _)| &i.name).collect();
        f.debug_struct("Tokens")
            .field("identities", &names)
            .finish()
    }
}

impl Tokens {
    /// One admin token (`DPO_TOKEN`, `--token-file`).
    pub fn single(token: String) -> Self {
        Tokens {
            entries: vec![(Identity::anonymous_admin(), token.into_bytes())],
        }
    }

    /// Whether callers must present a token.
    pub fn enabled(&self) -> bool {
        !self.entries.is_empty()
    }

    /// How many identities of each role (for the log).
    pub fn count(&self, role: Role) -> usize {
        self.entries.iter().filter(|(i, _)| i.role == role).count()
    }

    /// Reads a tokens file (`name token role` per line).
    pub fn read(path: &Path) -> Result<Self, TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the text of a tokens file named `path` (for errors).
    pub fn parse(text: &str, path: &str) -> Result<Self, TokensError> {
        let mut entries: Vec<(Identity, Vec<u8>)> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| TokensError::Line {
                path: path.to_string(),
                line: n + 1,
                reason,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, token, role] = fields[..] else {
                return Err(bad(format!(
                    "expected `name token role`, found {} fields",
                    fields.len()
                )));
            };
            let role = match role {
                "client" => Role::Client,
                "worker" => Role::Worker,
                "admin" => Role::Admin,
                other => {
                    return Err(bad(format!(
                        "role {other:?}: expected client, worker or admin"
                    )));
                }
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(bad(format!(
                    "name {name:?}: use letters, digits and - _ . @"
                )));
            }
            if token.len() < 16 {
                return Err(bad(format!(
                    "the token of {name:?} is {} characters; use at least 16 (random)",
                    token.len()
                )));
            }
            if entries.iter().any(|(i, _)| i.name == name) {
                return Err(bad(format!("{name:?} is named twice")));
            }
            if entries.iter().any(|(_, t)| t == token.as_bytes()) {
                return Err(bad(format!(
                    "the token of {name:?} is also another identity's"
                )));
            }
            entries.push((
                Identity {
                    name: name.to_string(),
                    role,
                },
                token.as_bytes().to_vec(),
            ));
        }
        if entries.is_empty() {
            return Err(TokensError::Empty {
                path: path.to_string(),
            });
        }
        Ok(Tokens { entries })
    }

    /// The identity `token` names. Compares with every token (no early exit),
    /// so the time taken does not tell which one nearly matched.
    fn identify(&self, token: &[u8]) -> Option<&Identity> {
        let mut found = None;
        for (identity, known) in &self.entries {
            if constant_time_eq(token, known) {
                found = Some(identity);
            }
        }
        found
    }

    /// The caller a presented bearer token names; everyone is the anonymous
    /// admin when no tokens are configured. Shared by the gRPC services and
    /// the HTTP run page.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Identity, Unauthenticated> {
        if !self.enabled() {
            return Ok(Identity::anonymous_admin());
        }
        let token = presented.ok_or(Unauthenticated::Missing)?;
        self.identify(token.as_bytes())
            .cloned()
            .ok_or(Unauthenticated::Wrong)
    }
}

/// Why a caller has no identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No bearer token, where tokens are required.
    Missing,
    /// A token no identity has.
    Wrong,
}

/// Checks a service's callers: a known token whose role is among `roles`.
#[derive(Clone, Debug)]
pub struct Gate {
    tokens: Arc<Tokens>,
    roles: &'static [Role],
    service: &'static str,
}

impl Gate {
    pub fn new(tokens: Arc<Tokens>, roles: &'static [Role], service: &'static str) -> Self {
        Gate {
            tokens,
            roles,
            service,
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let identity = self
            .tokens
            .authenticate(presented)
            .map_err(|why| match why {
                Unauthenticated::Missing => {
                    Status::unauthenticated("missing bearer token (set DPO_TOKEN)")
                }
                Unauthenticated::Wrong => Status::unauthenticated("wrong token"),
            })?;
        if !self.roles.contains(&identity.role) {
            tracing::warn!(identity = %identity.name, role = identity.role.as_str(), service = self.service, "refused a call outside the identity's role");
            return Err(Status::permission_denied(format!(
                "{:?} (role {}) may not call the {}",
                identity.name,
                identity.role.as_str(),
                self.service
            )));
        }
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The caller of a request that passed a [`Gate`].
pub fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::internal("the call did not pass the token check"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    const FILE: &str = "# who may call\n\
        alice  alice-0123456789abcdef  client\n\
        bob    bob-0123456789abcdef    client   # a second client\n\
        gpu-1  gpu-0123456789abcdef    worker\n\
        \n\
        ops    ops-0123456789abcdef    admin\n";

    fn call(gate: &mut Gate, token: Option<&str>) -> Result<Identity, Status> {
        let mut r = Request::new(());
        if let Some(t) = token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Status::internal("header"))?;
            r.metadata_mut().insert("authorization", v);
        }
        let r = gate.call(r)?;
        caller(&r)
    }

    #[test]
    fn each_token_names_its_identity_and_roles_gate_services()
    -> Result<(), Box<dyn std::error::Error>> {
        let tokens = Arc::new(Tokens::parse(FILE, "tokens")?);
        assert_eq!(tokens.count(Role::Client), 2);
        let mut runs = Gate::new(tokens.clone(), &[Role::Client, Role::Admin], "run service");
        let mut workers = Gate::new(tokens, &[Role::Worker, Role::Admin], "worker service");
        let bob = call(&mut runs, Some("bob-0123456789abcdef"))?;
        assert_eq!(bob.name, "bob");
        assert_eq!(bob.owner_filter(), Some("bob"));
        assert_eq!(
            call(&mut runs, Some("ops-0123456789abcdef"))?.owner_filter(),
            None
        );
        // A worker may not submit; a client may not act as a worker.
        let e = call(&mut runs, Some("gpu-0123456789abcdef")).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("\"gpu-1\" (role worker)"),
            "{}",
            e.message()
        );
        let e = call(&mut workers, Some("alice-0123456789abcdef")).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            call(&mut workers, Some("gpu-0123456789abcdef"))?.name,
            "gpu-1"
        );
        // Unknown or missing tokens.
        let e = call(&mut runs, Some("alice-0123456789abcdeX")).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = call(&mut runs, None).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // No tokens configured: everyone is the admin.
        let mut open = Gate::new(
            Arc::new(Tokens::default()),
            &[Role::Worker, Role::Admin],
            "worker service",
        );
        assert_eq!(call(&mut open, None)?, Identity::anonymous_admin());
        Ok(())
    }

    #[test]
    fn a_bad_tokens_file_names_the_line() {
        let cases = [
            (
                "alice tok client\n",
                ":1: the token of \"alice\" is 3 characters",
            ),
            (
                "# c\nalice alice-0123456789abcdef\n",
                ":2: expected `name token role`, found 2 fields",
            ),
            ("alice alice-0123456789abcdef root\n", ":1: role \"root\""),
            (
                "a aaaaaaaaaaaaaaaaaaaa client\nb aaaaaaaaaaaaaaaaaaaa client\n",
                ":2: the token of \"b\" is also another identity's",
            ),
            (
                "a aaaaaaaaaaaaaaaaaaaa client\na bbbbbbbbbbbbbbbbbbbb client\n",
                ":2: \"a\" is named twice",
            ),
            ("a/b aaaaaaaaaaaaaaaaaaaa client\n", ":1: name \"a/b\""),
            ("# nothing\n", "tokens: no tokens"),
        ];
        for (text, want) in cases {
            let e = Tokens::parse(text, "tokens")
                .map(|_| ())
                .expect_err("refused")
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
