//! Test support: start the real binary (proxy and mock provider) on ports from the OS,
//! and talk to them over real HTTP.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const KEY_A: &str = "tw-test-virtual-key-agent-a";
pub const KEY_B: &str = "tw-test-virtual-key-agent-b";
pub const OPENAI_KEY: &str = "sk-test-real-openai-key";
pub const ANTHROPIC_KEY: &str = "sk-ant-test-real-anthropic-key";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokenwarden")
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawns `tokenwarden ARGS`, waits for its first stdout line and returns it.
fn spawn_and_read_line(args: &[&str], envs: &[(&str, &str)], log: &Path) -> (Proc, String) {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = Command::new(bin())
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let proc = Proc {
        child,
        log: log.to_path_buf(),
    };
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            panic!(
                "no startup line from {args:?}; stderr:\n{}",
                proc.log_text()
            )
        });
    (proc, line)
}

/// Extracts `host:port` after `http://` or `https://`, the n-th occurrence.
fn addr_in(line: &str, n: usize) -> SocketAddr {
    let part = line
        .split("://")
        .nth(n + 1)
        .unwrap_or_else(|| panic!("no address {n} in {line:?}"));
    let end = part.find([' ', ')']).unwrap_or(part.len());
    part[..end].parse().unwrap()
}

/// The mock provider, started as `tokenwarden mock`.
pub struct Mock {
    pub proc: Proc,
    pub addr: SocketAddr,
    tls: bool,
    _dir: tempfile::TempDir,
}

/// The test certificate (for `localhost` and `127.0.0.1`) and its key.
pub const TLS_CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls-cert.pem");
pub const TLS_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls-key.pem");

impl Mock {
    pub fn start() -> Mock {
        Mock::start_with(&["mock", "--listen", "127.0.0.1:0"], false)
    }

    /// The mock over TLS (HTTP/2 and HTTP/1.1 by ALPN), with the test certificate.
    pub fn start_tls() -> Mock {
        Mock::start_with(
            &[
                "mock",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                TLS_CERT,
                "--tls-key",
                TLS_KEY,
            ],
            true,
        )
    }

    fn start_with(args: &[&str], tls: bool) -> Mock {
        let dir = tempfile::tempdir().unwrap();
        let (proc, line) = spawn_and_read_line(args, &[], &dir.path().join("mock.log"));
        assert_eq!(line.contains("https://"), tls, "{line}");
        Mock {
            addr: addr_in(&line, 0),
            proc,
            tls,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// What the mock has received so far.
    pub async fn requests(&self) -> Vec<Value> {
        let (status, _, body) = get(&format!("{}/mock/requests", self.url()), &[]).await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    pub async fn last_request(&self) -> Value {
        self.requests()
            .await
            .pop()
            .expect("the mock received no request")
    }

    /// Waits until the newest request's response has ended on the mock's side.
    pub async fn wait_for_outcome(&self) -> Value {
        for _ in 0..200 {
            let last = self.last_request().await;
            if last["outcome"] != "pending" {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the mock's last request never ended");
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

impl Drop for Proxy {
    /// Before the proxy goes: its log, every file it wrote (audit log, snapshot) and its
    /// metrics hold no secret. Every test that starts a proxy checks this.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for file in files_under(self.dir.path()) {
            let text = std::fs::read(&file).unwrap_or_default();
            assert_no_secret(&text, &SECRETS, &file.display().to_string());
        }
        if let Some(metrics) = blocking_get(self.admin, "/metrics") {
            assert_no_secret(&metrics, &SECRETS, "the metrics");
        }
    }
}

/// A plain HTTP/1.0 GET without the async runtime (for `Drop`); `None` if it fails.
fn blocking_get(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).ok()?;
    Some(out)
}

/// The proxy, started as `tokenwarden serve` on a config written to a temp dir.
pub struct Proxy {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Self::start_with_env(
            config,
            &[
                ("TW_TEST_OPENAI_KEY", OPENAI_KEY),
                ("TW_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY),
            ],
        )
    }

    pub fn start_with_env(config: &str, envs: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenwarden.toml");
        std::fs::write(&path, config).unwrap();
        let (proc, line) = spawn_and_read_line(
            &["serve", "--config", path.to_str().unwrap()],
            envs,
            &dir.path().join("proxy.log"),
        );
        Proxy {
            addr: addr_in(&line, 0),
            admin: addr_in(&line, 1),
            proc,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until the proxy's log holds `needle` `times` times (settlements that count
    /// tokens finish on the blocking pool, a moment after the response).
    pub async fn wait_for_log(&self, needle: &str, times: usize) {
        // Up to 15 s: the first count builds the tokenizer, slow on a loaded machine.
        for _ in 0..750 {
            if self.proc.log_text().matches(needle).count() >= times {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{needle:?} not {times} times in the log:\n{}",
            self.proc.log_text()
        );
    }

    /// Every line of the audit log in the proxy's data directory, parsed.
    pub fn audit_lines(&self) -> Vec<Value> {
        audit_lines_in(&self.dir.path().join("data/audit"))
    }

    /// Waits until the audit log holds `n` lines (the writer commits in groups, and
    /// settlements that count tokens finish a moment after the response).
    pub async fn wait_for_audit_lines(&self, n: usize) -> Vec<Value> {
        wait_for_audit_lines_in(&self.dir.path().join("data/audit"), n).await
    }

    /// The metrics page.
    pub async fn metrics_text(&self) -> String {
        let (status, _, body) = get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits until the metrics page holds the line `sample` (a counter the audit writer
    /// bumps after its fsync can trail the line it just made visible in the file).
    pub async fn wait_for_metric(&self, sample: &str) -> String {
        let mut text = String::new();
        for _ in 0..250 {
            text = self.metrics_text().await;
            if text.lines().any(|l| l == sample) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{sample:?} never appeared in the metrics:\n{text}");
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
}

/// Waits until the audit files in `dir` hold `n` lines (for a proxy whose data directory
/// The ledger snapshot a proxy whose data directory is `data` writes.
pub fn snapshot_path(data: &Path) -> PathBuf {
    data.join("ledger-snapshot.json")
}

/// Waits until the snapshot in `data` holds the audit log up to line `seq` at least.
pub async fn wait_for_snapshot(data: &Path, seq: u64) -> Value {
    let mut last = None;
    for _ in 0..250 {
        if let Ok(bytes) = std::fs::read(snapshot_path(data)) {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            if v["seq"].as_u64().unwrap() >= seq {
                return v;
            }
            last = Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no snapshot up to seq {seq}; last: {last:?}");
}

/// was set by [`with_storage`]).
pub async fn wait_for_audit_lines_in(dir: &Path, n: usize) -> Vec<Value> {
    for _ in 0..250 {
        let lines = audit_lines_in(dir);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the audit log never reached {n} lines: {:?}",
        audit_lines_in(dir)
    );
}

/// Every line of the audit files in `dir`, parsed, in chain order. The log may be being
/// written: a last line without its newline yet is not read.
pub fn audit_lines_in(dir: &Path) -> Vec<Value> {
    tokenwarden::audit::log_files(dir)
        .unwrap_or_default()
        .iter()
        .flat_map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let written = bytes
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(&[][..], |end| &bytes[..end]);
            written
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// The usual test config: OpenAI and Anthropic formats both served by the mock, two agents.
pub fn config(mock: &Mock) -> String {
    config_with(mock, "")
}

/// `config` with `lines` added to its `[server]` table.
pub fn with_server(config: &str, lines: &str) -> String {
    assert!(
        config.contains("[server]\n"),
        "no [server] table in {config}"
    );
    config.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
}

/// The usual config with extra `[upstream]` lines (time limits for fault tests).
pub fn config_with(mock: &Mock, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 1048576
shutdown_grace = "10s"
[admin]
listen = "127.0.0.1:0"
[upstream]
{upstream}
[[providers]]
name = "openai"
kind = "openai"
base_url = "{mock}"
prefix = "/openai"
api_key_env = "TW_TEST_OPENAI_KEY"
[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "{mock}"
prefix = "/anthropic"
api_key_env = "TW_TEST_ANTHROPIC_KEY"
[[agents]]
id = "agent-a"
team = "team-1"
key_sha256 = "{a}"
[[agents]]
id = "agent-b"
key_sha256 = "{b}"
"#,
        mock = mock.url(),
        a = tokenwarden::identity::key_digest_hex(KEY_A),
        b = tokenwarden::identity::key_digest_hex(KEY_B),
    )
}

pub type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP/1.1 client for `http://` and `https://` URLs; over TLS it trusts only the test
/// certificate.
pub fn client() -> TestClient {
    static TLS: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    let tls = TLS.get_or_init(|| {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(TLS_CERT).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    });
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(body.into())).unwrap()
}

/// The secrets every test process knows: none may ever appear in what the proxy says,
/// logs, writes or exports.
pub const SECRETS: [&str; 4] = [KEY_A, KEY_B, OPENAI_KEY, ANTHROPIC_KEY];

/// Panics if `text` holds one of `secrets`.
pub fn assert_no_secret(text: &[u8], secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(
            memchr::memmem::find(text, secret.as_bytes()).is_none(),
            "{what} holds the secret {secret:?}"
        );
    }
}

/// Sends a request and reads the whole response. No answer may carry a virtual key, nor
/// a provider key (but the mock's own record of what reached it, which holds the real
/// key the proxy sent).
pub async fn send(req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let own_record = req.uri().path().starts_with("/mock/");
    let response = client().request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let secrets: &[&str] = if own_record { &SECRETS[..2] } else { &SECRETS };
    assert_no_secret(&body, secrets, "a response body");
    for (name, value) in &parts.headers {
        assert_no_secret(
            value.as_bytes(),
            secrets,
            &format!("response header {name}"),
        );
    }
    (parts.status, parts.headers, body)
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    send(request("GET", url, headers, Bytes::new())).await
}

pub async fn post_json(
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(request("POST", url, &all, body.to_owned())).await
}

/// Reads a response body to its end: its bytes, and how it ended (an error for a stream
/// cut short, which must never look like a clean end).
pub async fn read_all(mut body: hyper::body::Incoming) -> (Vec<u8>, Result<(), hyper::Error>) {
    let mut bytes = Vec::new();
    loop {
        match body.frame().await {
            None => return (bytes, Ok(())),
            Some(Ok(frame)) => {
                bytes.extend_from_slice(frame.data_ref().map(|d| &d[..]).unwrap_or_default())
            }
            Some(Err(e)) => return (bytes, Err(e)),
        }
    }
}

/// Sends `signal` (`TERM`, `INT`, `HUP`, `KILL`) to a process the test started.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

pub fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// `config` with its data directory set to `data`, to restart a proxy on the same state
/// (into its `[storage]` table if it has one).
pub fn with_storage(config: &str, data: &Path) -> String {
    let dir = format!("dir = \"{}\"\n", data.display());
    if config.contains("[storage]\n") {
        config.replacen("[storage]\n", &format!("[storage]\n{dir}"), 1)
    } else {
        config.replace("[upstream]", &format!("[storage]\n{dir}[upstream]"))
    }
}

/// A numeric response header, parsed.
pub fn header_num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> T {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A `redis-server` of the test's own on a free port, killed when dropped; no
/// persistence, so a restart starts empty.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (the port stays this fixture's for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server on its port and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `n` requests at once, the i-th to `urls[i % urls.len()]`, as `key`; each read to
/// its end: (status, `x-should-retry`, body), in the order sent.
pub async fn concurrent_posts(
    urls: &[String],
    n: usize,
    key: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Vec<(u16, Option<String>, Bytes)> {
    let auth = bearer(key);
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let req = request("POST", &urls[i % urls.len()], &all, body);
            tokio::spawn(async move {
                let response = client().request(req).await.unwrap();
                let status = response.status().as_u16();
                let retry = response
                    .headers()
                    .get("x-should-retry")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, retry, body)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
