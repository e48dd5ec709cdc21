//! The coordinator's plain-HTTP port (`--metrics-listen`): Prometheus text at
//! `/metrics`, and a live page of the runs at `/` with the JSON it polls:
//!
//! - `GET /api/runs`: the runs (state, step, epoch, generation, world size,
//!   checkpoint, rollbacks) and the workers with their last heartbeat;
//! - `GET /api/runs/<id>/metrics?after=S&eval_after=E`: the run's
//!   `metrics.jsonl` lines after step `S` and `eval.jsonl` lines after `E`, at
//!   most [`MAX_LINES`] each (`more` says whether to ask again).
//!
//! The page is one file: the vendored chart library (uPlot, MIT) is compiled in
//! and inlined, nothing is fetched from elsewhere. When the coordinator has
//! tokens, the page and its JSON need one (`Authorization: Bearer`, or
//! `?token=` once, which the page then keeps for its tab); a client's token
//! shows its own runs, an admin's all of them, a worker's none. `/metrics`
//! holds only counters and stays open for scrapers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dpo_proto::v1;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::{Identity, Role, Tokens, Unauthenticated};
use crate::coordinator::Coordinator;

/// Lines of a metrics file one response carries at most.
pub const MAX_LINES: usize = 5000;
/// The longest request head read.
const MAX_HEAD: usize = 16 << 10;

const PAGE: &str = include_str!("../web/index.html");
const UPLOT_JS: &str = include_str!("../web/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../web/vendor/uplot/uPlot.min.css");

/// The page with the chart library inlined.
fn page() -> &'static str {
    static PAGE_FULL: OnceLock<String> = OnceLock::new();
    PAGE_FULL.get_or_init(|| {
        PAGE.replacen("/*UPLOT_CSS*/", UPLOT_CSS, 1)
            .replacen("/*UPLOT_JS*/", UPLOT_JS, 1)
    })
}

/// A parsed request head.
#[derive(Debug, Default)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    bearer: Option<String>,
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let bearer = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Bearer ").map(str::to_string));
    Some(Request {
        method,
        path: percent_decode(path),
        query,
        bearer,
    })
}

impl Request {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    kind: &'static str,
    body: String,
}

impl Response {
    fn json(v: &Value) -> Self {
        Response {
            status: "200 OK",
            kind: "application/json",
            body: v.to_string(),
        }
    }

    fn error(status: &'static str, why: &str) -> Self {
        Response {
            status,
            kind: "application/json",
            body: json!({ "error": why }).to_string(),
        }
    }
}

/// The page shown without a token: a form that asks for one.
const ASK_TOKEN: &str = "<!doctype html><meta charset=utf-8><title>dpo-cluster</title>\
<body style=\"font:14px system-ui;margin:40px\"><h1 style=\"font-size:17px\">dpo-cluster</h1>\
<p>This coordinator needs a token (the one <code>dpoctl</code> uses as DPO_TOKEN).</p>\
<form method=get action=\"/\"><input name=token type=password size=40 autofocus> \
<button>Open</button></form></body>";

/// Serves `/metrics`, the run page and its JSON on `addr` until the process ends.
pub async fn serve_http(
    coordinator: Arc<Coordinator>,
    tokens: Arc<Tokens>,
    addr: SocketAddr,
    options: HttpOptions,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving the run page at / and Prometheus metrics at /metrics");
    // At most MAX_CONNECTIONS at once: the rest wait in the listen backlog
    // rather than taking the descriptors the gRPC side and the store need.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF;
    loop {
        let permit = permits.clone().acquire_owned().await?;
        let mut socket = match listener.accept().await {
            Ok((socket, _)) => {
                backoff = ACCEPT_BACKOFF;
                socket
            }
            // Out of descriptors (EMFILE), or a connection reset before it was
            // taken: the port stays open; wait a little and take the next.
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "HTTP endpoint: accepting a connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let c = coordinator.clone();
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let head =
                match tokio::time::timeout(Duration::from_secs(10), read_head(&mut socket)).await {
                    Ok(Some(h)) => h,
                    _ => return,
                };
            let r = match parse(&head) {
                Some(r) => answer(&c, &tokens, &r, options).await,
                None => Response::error("400 Bad Request", "not an HTTP request"),
            };
            let response = format!(
                "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
                 X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n\
                 Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; connect-src 'self'; img-src data:; form-action 'self'\r\n\
                 Connection: close\r\n\r\n",
                r.status,
                r.kind,
                r.body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.write_all(r.body.as_bytes()).await;
        });
    }
}

/// The request head (up to the blank line), bounded.
async fn read_head(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Who is asking (a token from the header, or `?token=`): `Err` is the refusal.
fn who(tokens: &Tokens, r: &Request) -> Result<Identity, Response> {
    let presented = r.bearer.as_deref().or_else(|| r.param("token"));
    match tokens.authenticate(presented) {
        Ok(i) if i.role == Role::Worker => Err(Response::error(
            "403 Forbidden",
            "a worker's token does not show runs",
        )),
        Ok(i) => Ok(i),
        Err(Unauthenticated::Missing) => Err(Response::error(
            "401 Unauthorized",
            "a bearer token is needed",
        )),
        Err(Unauthenticated::Wrong) => Err(Response::error("401 Unauthorized", "wrong token")),
    }
}

/// What the HTTP port serves beyond its defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpOptions {
    /// `/metrics` (which needs no token) labels each run's step with its name
    /// and state (`--metrics-run-labels`); otherwise it counts runs by state.
    pub run_labels: bool,
}

/// Connections the HTTP port serves at once.
const MAX_CONNECTIONS: usize = 128;
/// The first wait after a failed accept (doubling up to a second).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

async fn answer(c: &Coordinator, tokens: &Tokens, r: &Request, options: HttpOptions) -> Response {
    if r.method != "GET" {
        return Response::error("405 Method Not Allowed", "only GET");
    }
    if r.path == "/metrics" {
        return Response {
            status: "200 OK",
            kind: "text/plain; version=0.0.4",
            body: crate::service::prometheus_text(c, options.run_labels).await,
        };
    }
    if r.path == "/" {
        return match who(tokens, r) {
            Ok(_) => Response {
                status: "200 OK",
                kind: "text/html; charset=utf-8",
                body: page().to_string(),
            },
            Err(refusal) => Response {
                status: refusal.status,
                kind: "text/html; charset=utf-8",
                body: ASK_TOKEN.to_string(),
            },
        };
    }
    let identity = match who(tokens, r) {
        Ok(i) => i,
        Err(refusal) => return refusal,
    };
    let owner = identity.owner_filter();
    if r.path == "/api/runs" {
        let runs = c.list(owner).await;
        // A client sees the workers of its own runs and the idle ones.
        let workers: Vec<Value> = c
            .workers()
            .await
            .iter()
            .filter(|w| {
                owner.is_none() || w.run_id.is_empty() || runs.iter().any(|r| r.id == w.run_id)
            })
            .map(worker_json)
            .collect();
        return Response::json(&json!({
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
            "workers": workers,
        }));
    }
    if let Some(rest) = r.path.strip_prefix("/api/runs/")
        && let Some(id) = rest.strip_suffix("/metrics")
    {
        let run = match c.get(id, owner).await {
            Ok(run) => run,
            Err(_) => return Response::error("404 Not Found", "no such run"),
        };
        let number = |key: &str, default: i64| {
            r.param(key)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(default)
        };
        let (after, eval_after) = (number("after", 0), number("eval_after", -1));
        if after < 0 || eval_after < -1 {
            return Response::error(
                "400 Bad Request",
                "after must be a step (0 or more), eval_after a step or -1",
            );
        }
        let out = std::path::PathBuf::from(&run.output);
        let read = tokio::task::spawn_blocking(move || {
            let (train, more_train) = lines_after(&out.join("metrics.jsonl"), after);
            let (eval, more_eval) = lines_after(&out.join("eval.jsonl"), eval_after);
            json!({ "train": train, "eval": eval, "more": more_train || more_eval })
        })
        .await;
        return match read {
            Ok(v) => Response::json(&v),
            Err(e) => Response::error("500 Internal Server Error", &e.to_string()),
        };
    }
    Response::error("404 Not Found", "not found")
}

/// Where each complete line of a metrics file starts, with its step: read once
/// and extended as the file grows, so a poll reads only the lines it returns.
#[derive(Debug, Default)]
struct LineIndex {
    /// Bytes indexed (up to the end of the last complete line).
    len: u64,
    /// (step, byte offset) of each line, in file order.
    lines: Vec<(i64, u64)>,
    /// When a poll last read it.
    used: Option<std::time::Instant>,
}

/// An index no page has polled for this long is dropped (its run ended, or
/// nobody watches it); a later poll indexes the file anew.
const INDEX_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// At most this many files are indexed at once; past it the least recently
/// polled goes.
const MAX_INDEXES: usize = 256;

/// Drops the indexes idle for [`INDEX_IDLE`] at `now`, and makes room for one
/// more under [`MAX_INDEXES`] unless `wanted` is already indexed.
fn evict(indexes: &mut HashMap<PathBuf, LineIndex>, now: std::time::Instant, wanted: &Path) {
    indexes.retain(|_, i| i.used.is_some_and(|u| now.duration_since(u) < INDEX_IDLE));
    while indexes.len() >= MAX_INDEXES && !indexes.contains_key(wanted) {
        let oldest = indexes
            .iter()
            .min_by_key(|(_, i)| i.used)
            .map(|(p, _)| p.clone());
        match oldest {
            Some(p) => indexes.remove(&p),
            None => break,
        };
    }
}

impl LineIndex {
    /// Indexes what was appended since; starts over when the file shrank (a
    /// restarted coordinator trims lines it never recorded).
    fn update(&mut self, path: &Path) -> std::io::Result<()> {
        use std::io::{BufRead, Seek, SeekFrom};
        let file = open_own(path)?;
        let len = file.metadata()?.len();
        if len < self.len {
            *self = LineIndex {
                used: self.used,
                ..LineIndex::default()
            };
        }
        if len == self.len {
            return Ok(());
        }
        let mut f = std::io::BufReader::new(file);
        f.seek(SeekFrom::Start(self.len))?;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = f.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Ok(()); // the end, or a line still being written
            }
            let step = dpo_data::metrics_log::step_of(&line).map_or(-1, |s| s as i64);
            self.lines.push((step, self.len));
            self.len += n as u64;
        }
    }
}

/// Opens a run's own metrics file: a regular file, reached through no symbolic
/// link (its output folder, or the file, swapped for a link after the submit
/// would otherwise serve another owner's file).
fn open_own(path: &Path) -> std::io::Result<std::fs::File> {
    dpo_data::confined::open_beneath(path, dpo_data::confined::Access::Read)
}

/// The lines of a metrics file whose step is after `after` (at most
/// [`MAX_LINES`]; `true`: there are more). A missing file has none.
fn lines_after(path: &Path, after: i64) -> (Vec<Value>, bool) {
    use std::io::{BufRead, Seek, SeekFrom};
    static INDEXES: OnceLock<std::sync::Mutex<HashMap<PathBuf, LineIndex>>> = OnceLock::new();
    let mut indexes = match INDEXES.get_or_init(Default::default).lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let now = std::time::Instant::now();
    evict(&mut indexes, now, path);
    let index = indexes.entry(path.to_path_buf()).or_default();
    index.used = Some(now);
    if index.update(path).is_err() {
        return (Vec::new(), false);
    }
    // Steps only grow along the file.
    let from = index.lines.partition_point(|(step, _)| *step <= after);
    let wanted = &index.lines[from..];
    let Some(&(_, offset)) = wanted.first() else {
        return (Vec::new(), false);
    };
    let take = wanted.len().min(MAX_LINES);
    let mut out = Vec::with_capacity(take);
    let Ok(mut f) = open_own(path).map(std::io::BufReader::new) else {
        return (Vec::new(), false);
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return (Vec::new(), false);
    }
    for line in f.lines().take(take) {
        let Ok(line) = line else { break };
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            out.push(v);
        }
    }
    (out, wanted.len() > MAX_LINES)
}

fn run_json(r: &v1::Run) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "state": v1::RunState::try_from(r.state).map_or("UNKNOWN", |s| s.as_str_name()),
        "step": r.step,
        "total_steps": r.total_steps,
        "steps_per_epoch": r.steps_per_epoch,
        "generation": r.generation,
        "world_size": r.world_size,
        "error": r.error,
        "checkpoint_step": r.checkpoint_step,
        "submitted_unix_ms": r.submitted_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "owner": r.owner,
        "train_examples": r.train_examples,
        "eval_examples": r.eval_examples,
        "rollbacks": r.rollbacks.iter().map(|b| json!({
            "generation": b.generation,
            "from_step": b.from_step,
            "to_step": b.to_step,
            "reason": b.reason,
        })).collect::<Vec<_>>(),
    })
}

fn worker_json(w: &v1::WorkerInfo) -> Value {
    json!({
        "id": w.id,
        "hostname": w.hostname,
        "device": w.device,
        "run_id": w.run_id,
        "rank": w.rank,
        "generation": w.generation,
        "last_seen_ms": w.last_seen_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_parsed_with_their_token_and_query() {
        let r = parse(
            "GET /api/runs/a%20b/metrics?after=12&token=x%2By HTTP/1.1\r\nHost: h\r\n\
             authorization: Bearer s3cret\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/runs/a b/metrics");
        assert_eq!(r.param("after"), Some("12"));
        assert_eq!(r.param("token"), Some("x+y"));
        assert_eq!(r.bearer.as_deref(), Some("s3cret"));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é"), "%é");
        assert_eq!(percent_decode("a%41"), "aA");
    }

    #[test]
    fn the_page_inlines_the_chart_library() {
        let p = page();
        assert!(!p.contains("/*UPLOT_JS*/") && !p.contains("/*UPLOT_CSS*/"));
        assert!(p.contains("uPlot"));
        assert!(!p.contains("<script src"), "nothing fetched from elsewhere");
    }

    #[test]
    fn a_metrics_file_or_output_swapped_for_a_link_is_not_served() -> std::io::Result<()> {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir()?;
        let secret = dir.path().join("secret.jsonl");
        std::fs::write(&secret, "{\"step\":1,\"secret\":true}\n")?;
        let out = dir.path().join("out");
        std::fs::create_dir(&out)?;
        symlink(&secret, out.join("metrics.jsonl"))?;
        assert!(lines_after(&out.join("metrics.jsonl"), 0).0.is_empty());
        let real = dir.path().join("real");
        std::fs::create_dir(&real)?;
        std::fs::copy(&secret, real.join("metrics.jsonl"))?;
        let linked = dir.path().join("linked");
        symlink(&real, &linked)?;
        assert!(lines_after(&linked.join("metrics.jsonl"), 0).0.is_empty());
        assert_eq!(lines_after(&real.join("metrics.jsonl"), 0).0.len(), 1);
        Ok(())
    }

    #[test]
    fn metrics_lines_are_read_after_a_step_in_bounded_pieces() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=(MAX_LINES + 3) {
            text += &format!("{{\"step\":{s},\"loss\":0.5}}\n");
        }
        text += "{\"step\":"; // a line still being written
        std::fs::write(&p, text)?;
        let (lines, more) = lines_after(&p, 0);
        assert_eq!((lines.len(), more), (MAX_LINES, true));
        let (lines, more) = lines_after(&p, MAX_LINES as i64);
        assert_eq!((lines.len(), more), (3, false));
        assert_eq!(lines[0]["step"], MAX_LINES + 1);
        assert_eq!(lines_after(&dir.path().join("none.jsonl"), 0).0.len(), 0);
        // The line being written is finished, more are appended: found.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p)?;
        use std::io::Write;
        let last = MAX_LINES + 4;
        write!(
            f,
            "{last},\"loss\":0.25}}\n{{\"step\":{},\"loss\":0.5}}\n",
            last + 1
        )?;
        let (lines, more) = lines_after(&p, MAX_LINES as i64 + 3);
        assert_eq!((lines.len(), more), (2, false));
        assert_eq!(lines[0]["loss"], 0.25);
        // Trimmed (a restarted coordinator) and written again: indexed anew.
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":0.75}\n{\"step\":2,\"loss\":0.5}\n",
        )?;
        let (lines, _) = lines_after(&p, 1);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["loss"], 0.5);
        Ok(())
    }

    #[test]
    fn metrics_indexes_are_dropped_when_idle_and_bounded_in_number() {
        let t0 = std::time::Instant::now();
        let mut indexes: HashMap<PathBuf, LineIndex> = HashMap::new();
        let at = |secs: u64| t0 + std::time::Duration::from_secs(secs);
        for n in 0..MAX_INDEXES {
            indexes.insert(
                PathBuf::from(format!("/runs/{n}/metrics.jsonl")),
                LineIndex {
                    used: Some(at(n as u64)),
                    ..LineIndex::default()
                },
            );
        }
        // Full: a new file pushes out the least recently polled one.
        evict(
            &mut indexes,
            at(MAX_INDEXES as u64),
            Path::new("/runs/new/metrics.jsonl"),
        );
        assert_eq!(indexes.len(), MAX_INDEXES - 1);
        assert!(!indexes.contains_key(Path::new("/runs/0/metrics.jsonl")));
        // One already indexed needs no room.
        let mut full = indexes.len();
        evict(
            &mut indexes,
            at(MAX_INDEXES as u64),
            Path::new("/runs/1/metrics.jsonl"),
        );
        assert_eq!(indexes.len(), full);
        // Idle ones go, whatever the count.
        full = indexes.len();
        evict(&mut indexes, at(10 + INDEX_IDLE.as_secs()), Path::new("/x"));
        assert_eq!(indexes.len(), full - 10, "indexes polled at 1..=10 s went");
        evict(
            &mut indexes,
            at(1000 + INDEX_IDLE.as_secs()),
            Path::new("/x"),
        );
        assert!(indexes.is_empty());
    }
}
