//! The observability claims, checked against the running service: the commit lag is exact
//! (0 when drained, the number of waiting records while the service is down), the counters
//! and histograms match what was processed, the health endpoints answer, and a real
//! Prometheus scraping the service evaluates every dashboard and alert expression to data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payrecon::tools::simulate::SimulationOptions;
use serde_json::Value;

use crate::helpers::{Fixture, Service, free_port, metric_value, simulation, wait_for};

// ------------------------------------------------------------------------------ helpers

/// The samples of metric `name` in a Prometheus text exposition: (label text, value).
fn samples<'a>(body: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let labels = if let Some(r) = rest.strip_prefix('{') {
                &r[..r.rfind('}')?]
            } else if rest.starts_with(' ') {
                ""
            } else {
                return None;
            };
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((labels, value))
        })
        .collect()
}

/// HTTP status of `GET http://127.0.0.1:{port}{path}`, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let r = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// Polls the service's /metrics until `done(body)` holds; returns that body.
async fn poll_metrics(
    service: &Service,
    fx: &Fixture,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(body) = service.metrics().await {
            if done(&body) {
                return body;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last /metrics lag lines:\n{}\n{}",
            last.lines()
                .filter(|l| l.starts_with("payrecon_commit_lag")
                    || l.starts_with("payrecon_records_total"))
                .collect::<Vec<_>>()
                .join("\n"),
            fx.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const LAG: &str = "payrecon_commit_lag";
const LAG_SECONDS: &str = "payrecon_commit_lag_seconds";
const LAG_REFRESHED: &str = "payrecon_commit_lag_last_refresh_timestamp_seconds";

/// True when the body holds a lag gauge for every one of `series` partitions and all are 0.
fn lag_is_zero(body: &str, series: usize) -> bool {
    let lag = samples(body, LAG);
    let secs = samples(body, LAG_SECONDS);
    lag.len() == series
        && secs.len() == series
        && lag.iter().all(|(_, v)| *v == 0.0)
        && secs.iter().all(|(_, v)| *v == 0.0)
}

// ------------------------------------------------------------------- commit lag, counters

#[tokio::test(flavor = "multi_thread")]
async fn commit_lag_reaches_zero_when_drained_and_rises_while_the_service_is_stopped() {
    let started = Instant::now();
    let fx = Fixture::new(2).await;
    // The three input topics have 2 partitions: 6 lag series.
    let series = 6;
    let encoder = fx.encoder().await;
    let (records, expected) =
        payrecon::tools::simulate::generate(&simulation(2_000, 1_001), encoder.payment_schema_id())
            .unwrap();
    let distinct =
        (expected.payment_events + expected.settlement_lines + expected.statement_lines) as f64;
    let produced = records.len() as f64;
    assert!(produced > distinct, "the simulation should hold duplicates");

    let service = fx.spawn_service("observability-a", &[]);
    wait_for(
        Duration::from_secs(60),
        "/health/live to answer 200",
        || async { http_status(service.metrics_port, "/health/live").await == Some(200) },
    )
    .await;
    // Ready once the group is joined (all 4 partitions are this instance's), the database
    // answers and the lag reporter reached the broker.
    wait_for(
        Duration::from_secs(90),
        "/health/ready to answer 200 with all partitions assigned",
        || async {
            service
                .metric("payrecon_assigned_partitions", &[])
                .await
                .unwrap_or(0.0)
                == series as f64
                && http_status(service.metrics_port, "/health/ready").await == Some(200)
        },
    )
    .await;
    eprintln!("[lag] service ready after {:?}", started.elapsed());

    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(180)).await;
    eprintln!(
        "[lag] {} records drained after {:?}",
        records.len(),
        started.elapsed()
    );

    // The lag reporter runs every second; the counters are bumped right after each commit.
    let body = poll_metrics(
        &service,
        &fx,
        Duration::from_secs(60),
        "commit lag 0 on every partition and every record counted",
        |b| {
            lag_is_zero(b, series)
                && metric_value(b, "payrecon_records_total", &["outcome=\"applied\""])
                    + metric_value(b, "payrecon_records_total", &["outcome=\"duplicate\""])
                    >= produced
        },
    )
    .await;
    let applied = metric_value(&body, "payrecon_records_total", &["outcome=\"applied\""]);
    let duplicates = metric_value(&body, "payrecon_records_total", &["outcome=\"duplicate\""]);
    let dead = metric_value(
        &body,
        "payrecon_records_total",
        &["outcome=\"dead_lettered\""],
    );
    assert_eq!(
        applied, distinct,
        "applied records != distinct payment events + settlement lines"
    );
    assert_eq!(
        duplicates,
        produced - distinct,
        "duplicate records != records produced - distinct records"
    );
    assert_eq!(dead, 0.0, "simulation() produces no malformed record");
    assert_eq!(metric_value(&body, "payrecon_dead_letters_total", &[]), 0.0);
    assert!(metric_value(&body, "payrecon_batches_total", &["outcome=\"committed\""]) > 0.0);
    assert_eq!(
        metric_value(&body, "payrecon_batches_total", &["outcome=\"fenced\""]),
        0.0,
        "a single instance is never fenced"
    );
    for histogram in [
        "payrecon_end_to_end_latency_seconds_count",
        "payrecon_batch_commit_duration_seconds_count",
        "payrecon_batch_decode_duration_seconds_count",
        "payrecon_batch_records_count",
    ] {
        assert!(
            metric_value(&body, histogram, &[]) > 0.0,
            "{histogram} has no observation"
        );
    }
    // Every record produced is in exactly one committed batch; each has a broker timestamp.
    assert_eq!(
        metric_value(&body, "payrecon_batch_records_sum", &[]),
        produced
    );
    assert_eq!(
        metric_value(&body, "payrecon_end_to_end_latency_seconds_count", &[]),
        produced
    );
    assert!(metric_value(&body, LAG_REFRESHED, &[]) > 0.0);
    assert_eq!(
        http_status(service.metrics_port, "/health/live").await,
        Some(200)
    );
    assert_eq!(
        http_status(service.metrics_port, "/health/ready").await,
        Some(200)
    );

    assert_eq!(
        service.terminate(Duration::from_secs(30)).await,
        Some(0),
        "SIGTERM must stop the service cleanly:\n{}",
        fx.log_tail()
    );

    // Records produced while no instance runs: the lag of the next instance is exactly that.
    let (more, more_expected) =
        payrecon::tools::simulate::generate(&simulation(500, 1_002), encoder.payment_schema_id())
            .unwrap();
    fx.produce_records(&encoder, &more, 0).await;
    let waiting = more.len() as f64;
    eprintln!(
        "[lag] {} records produced while stopped, at {:?}",
        more.len(),
        started.elapsed()
    );

    // This instance collects for 10 s before its first commit, so its first lag refresh
    // (immediate at start-up) sees the offsets the first instance left behind.
    let slow = fx.spawn_service(
        "observability-b",
        &[
            ("PAYRECON_PIPELINE__BATCH_LINGER", "10s"),
            ("PAYRECON_PIPELINE__BATCH_MAX_RECORDS", "1000000"),
        ],
    );
    let body = poll_metrics(
        &slow,
        &fx,
        Duration::from_secs(60),
        "the second instance's first lag refresh",
        // Set after every partition's gauges of a refresh.
        |b| metric_value(b, LAG_REFRESHED, &[]) > 0.0,
    )
    .await;
    let committed = metric_value(&body, "payrecon_batches_total", &["outcome=\"committed\""]);
    assert_eq!(
        committed, 0.0,
        "the second instance committed before its lag could be read; the check is meaningless"
    );
    let lag = samples(&body, LAG);
    assert_eq!(lag.len(), series, "lag series: {lag:?}");
    assert_eq!(
        lag.iter().map(|(_, v)| v).sum::<f64>(),
        waiting,
        "commit lag != records produced while the service was down: {lag:?}"
    );
    let secs = samples(&body, LAG_SECONDS);
    assert_eq!(secs.len(), series);
    for (labels, records) in &lag {
        let age = secs
            .iter()
            .find(|(l, _)| l == labels)
            .map(|(_, v)| *v)
            .unwrap();
        // A partition with waiting records reports the age of its last committed record
        // (which is older than the second batch); a caught-up one reports 0.
        assert_eq!(
            age > 0.0,
            *records > 0.0,
            "{labels}: {records} records behind but {age} s"
        );
    }
    eprintln!(
        "[lag] second instance's first refresh: lag {waiting} after {:?}",
        started.elapsed()
    );

    fx.wait_drained(Duration::from_secs(180)).await;
    let body = poll_metrics(
        &slow,
        &fx,
        Duration::from_secs(60),
        "commit lag back to 0 after the restart",
        |b| lag_is_zero(b, series),
    )
    .await;
    let distinct_more = (more_expected.payment_events
        + more_expected.settlement_lines
        + more_expected.statement_lines) as f64;
    assert_eq!(
        metric_value(&body, "payrecon_records_total", &["outcome=\"applied\""]),
        distinct_more,
        "the second instance applies exactly the records produced while it was down"
    );
    assert_eq!(
        metric_value(&body, "payrecon_records_total", &["outcome=\"duplicate\""]),
        waiting - distinct_more
    );
    assert_eq!(
        slow.terminate(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        fx.log_tail()
    );
    eprintln!("[lag] done after {:?}", started.elapsed());
}

// ----------------------------------------------------------------------- real Prometheus

/// A `prometheus` server scraping the service, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Prometheus {
    fn start(binary: &Path, target_port: u16, rule_file: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: payrecon\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
                rules = rule_file.display().to_string(),
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base), params)
            .map_err(|e| e.to_string())?;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let code = response.status();
        response
            .json::<Value>()
            .await
            .map_err(|e| format!("HTTP {code}, body is not JSON: {e}"))
    }

    /// Evaluates `expr` now: the number of results, or Prometheus' error.
    async fn query(&self, expr: &str) -> Result<usize, String> {
        let body = self.get("/api/v1/query", &[("query", expr)]).await?;
        if body["status"] != "success" {
            return Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ));
        }
        match body["data"]["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(body["data"]["result"].as_array().map_or(0, Vec::len)),
            Some("scalar" | "string") => Ok(1),
            other => Err(format!("unexpected resultType {other:?}")),
        }
    }

    /// The fewest samples any series whose name matches `name_regex` has in the last
    /// `window` (`None` if there is no such series).
    async fn fewest_samples(&self, name_regex: &str, window: &str) -> Option<usize> {
        let expr = format!("{{__name__=~\"{name_regex}\"}}[{window}]");
        let body = self.get("/api/v1/query", &[("query", &expr)]).await.ok()?;
        body["data"]["result"]
            .as_array()?
            .iter()
            .map(|s| s["values"].as_array().map_or(0, Vec::len))
            .min()
    }

    /// The value of the first sample `expr` returns.
    async fn value(&self, expr: &str) -> Option<f64> {
        let body = self.get("/api/v1/query", &[("query", expr)]).await.ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `prometheus` executable on PATH.
fn prometheus_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

// ----------------------------------------------------------------- Grafana expressions

/// Values for Grafana's built-in variables, as the provisioned Prometheus datasource
/// (timeInterval 15s) would give them on a 5 minute dashboard: `$__rate_interval` is at
/// least 4 scrape intervals.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__interval_ms", "15000"),
    ("__range", "5m"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
];

/// Dashboard variables: name -> value substituted into expressions. Query and custom
/// variables are multi-value regex matchers ("All" = their `allValue`, else `.*`).
fn dashboard_variables(dashboard: &Value) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = GRAFANA_BUILTINS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = v["name"].as_str() else {
            continue;
        };
        let value = match v["type"].as_str() {
            Some("constant") => v["query"].as_str().unwrap_or_default().to_owned(),
            Some("interval" | "textbox") => {
                v["current"]["value"].as_str().unwrap_or("1m").to_owned()
            }
            Some("datasource") => "prometheus".to_owned(),
            _ => v["allValue"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or(".*")
                .to_owned(),
        };
        vars.insert(name.to_owned(), value);
    }
    vars
}

/// Replaces `$name`, `${name}`, `${name:format}` and `[[name]]`; unknown names are left.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if let Some(t) = tail.strip_prefix("${") {
            match t.find('}') {
                Some(end) => (t[..end].split(':').next().unwrap_or(""), end + 3),
                None => ("", 1),
            }
        } else if let Some(t) = tail.strip_prefix("[[") {
            match t.find("]]") {
                Some(end) => (t[..end].split(':').next().unwrap_or(""), end + 4),
                None => ("", 1),
            }
        } else if let Some(t) = tail.strip_prefix('$') {
            let end = t
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(t.len());
            (&t[..end], end + 1)
        } else {
            ("", 1)
        };
        match vars.get(name) {
            Some(value) if !name.is_empty() => out.push_str(value),
            _ => out.push_str(&tail[..len]),
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Whether a datasource reference (panel or target) is Prometheus; `None` when unset.
fn is_prometheus(ds: &Value) -> Option<bool> {
    match ds {
        Value::Null => None,
        Value::String(s) => Some(s.to_lowercase().contains("prometheus") || s.contains('$')),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("datasource") => None, // "-- Mixed --": the targets say
            Some(t) => Some(t == "prometheus"),
            None => Some(
                o.get("uid")
                    .and_then(Value::as_str)
                    .is_some_and(|u| u.to_lowercase().contains("prometheus") || u.contains('$')),
            ),
        },
        _ => None,
    }
}

/// (where, expression) of every Prometheus target of every panel, rows' nested panels
/// included. A target with no datasource of its own uses its panel's; with neither, the
/// default datasource, which is Prometheus (grafana/provisioning/datasources).
fn dashboard_expressions(path: &Path, dashboard: &Value, out: &mut Vec<(String, String)>) {
    fn walk(file: &str, panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for (n, target) in panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                let prometheus = is_prometheus(&target["datasource"])
                    .or_else(|| is_prometheus(&panel["datasource"]))
                    .unwrap_or(true);
                if prometheus {
                    out.push((format!("{file} / {title} / target {n}"), expr.to_owned()));
                }
            }
            walk(file, &panel["panels"], out);
        }
    }
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    walk(&file, &dashboard["panels"], out);
}

/// `label_values(selector, label)` of Prometheus query variables, as a PromQL expression
/// that returns one series per value: `count by (label) (selector)`.
fn variable_expressions(path: &Path, dashboard: &Value, out: &mut Vec<(String, String)>) {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" || is_prometheus(&v["datasource"]) == Some(false) {
            continue;
        }
        let query = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default()
            .trim();
        let name = v["name"].as_str().unwrap_or("?");
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        else {
            out.push((
                format!("{file} / variable {name}"),
                format!("unsupported variable query {query:?}"),
            ));
            continue;
        };
        let Some((selector, label)) = args.rsplit_once(',') else {
            continue; // label_values(label): every series; nothing specific to check
        };
        out.push((
            format!("{file} / variable {name}"),
            format!("count by ({}) ({})", label.trim(), selector.trim()),
        ));
    }
}

// ------------------------------------------------------------------- alert expressions

/// (rule name, expr) of every rule of a Prometheus rules file. A line-based reader (no YAML
/// dependency): handles `expr:` as a plain, quoted or continued scalar and as a `|`/`>`
/// block scalar, and pairs it with the `alert:`/`record:` of the same list item. The test
/// compares what it reads with the rules Prometheus loaded.
fn rule_expressions(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let mut names: BTreeMap<usize, String> = BTreeMap::new();
    let mut exprs: Vec<(usize, String)> = Vec::new();
    let mut item = 0;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') {
            continue;
        }
        let body = match trimmed.strip_prefix("- ") {
            Some(b) => {
                item += 1;
                b.trim_start()
            }
            None => trimmed,
        };
        let key_indent = line.len() - body.len();
        let value_of = |key: &str| {
            body.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .filter(|r| r.is_empty() || r.starts_with([' ', '\t']))
                .map(str::trim)
        };
        if let Some(v) = value_of("alert").or_else(|| value_of("record")) {
            names.insert(item, v.trim_matches(['"', '\'']).to_owned());
            continue;
        }
        let Some(v) = value_of("expr") else {
            continue;
        };
        // Lines that belong to this value: more indented than the key (or blank).
        let mut continuation = Vec::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > key_indent) {
            continuation.push(lines[i]);
            i += 1;
        }
        while continuation.last().is_some_and(|l| l.trim().is_empty()) {
            continuation.pop();
            i -= 1;
        }
        let expr = if v.starts_with('|') || v.starts_with('>') {
            // Block scalar: PromQL does not care whether lines are folded or kept.
            let block_indent = continuation
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| indent_of(l))
                .min()
                .unwrap_or(0);
            continuation
                .iter()
                .map(|l| l.get(block_indent..).unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            let mut text = v.to_owned();
            for l in &continuation {
                text.push(' ');
                text.push_str(l.trim());
            }
            if let Some(q) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                q.replace("\\\"", "\"").replace("\\\\", "\\")
            } else if let Some(q) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
                q.replace("''", "'")
            } else {
                // A plain scalar ends at a comment.
                text.split(" #").next().unwrap_or_default().to_owned()
            }
        };
        exprs.push((item, expr.trim().to_owned()));
    }
    exprs
        .into_iter()
        .map(|(item, expr)| {
            (
                names.get(&item).cloned().unwrap_or_else(|| "?".into()),
                expr,
            )
        })
        .collect()
}

/// Names of the rule groups (`- name:` items) of a rules file.
fn rule_groups(yaml: &str) -> BTreeSet<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- name:"))
        .map(|n| n.trim().trim_matches(['"', '\'']).to_owned())
        .collect()
}

/// Byte ranges of `expr` at parenthesis/bracket/brace depth 0, outside string literals:
/// calls `f(index)` for each such index; stops when it returns true.
fn scan_top_level(expr: &str, mut f: impl FnMut(usize) -> bool) {
    let bytes = expr.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ if depth == 0 && f(i) => return,
                _ => {}
            }
        }
        i += 1;
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Operands of the top-level set operators (`and`, `or`, `unless`), or `[expr]`.
fn split_set_operators(expr: &str) -> Vec<&str> {
    let bytes = expr.as_bytes();
    let mut cuts = Vec::new();
    scan_top_level(expr, |i| {
        if i > 0 && is_ident(bytes[i - 1]) {
            return false;
        }
        for op in ["and", "or", "unless"] {
            let end = i + op.len();
            if expr[i..].starts_with(op) && bytes.get(end).is_none_or(|c| !is_ident(*c)) {
                cuts.push((i, end));
            }
        }
        false
    });
    let mut parts = Vec::new();
    let mut start = 0;
    for (from, to) in cuts {
        parts.push(&expr[start..from]);
        start = to;
    }
    parts.push(&expr[start..]);
    parts
}

/// The first top-level comparison operator: (start, end) of the operator.
fn first_comparison(expr: &str) -> Option<(usize, usize)> {
    let bytes = expr.as_bytes();
    let mut found = None;
    scan_top_level(expr, |i| {
        let two = bytes.get(i..i + 2);
        found = match (bytes[i], two) {
            (_, Some(b"==" | b"!=" | b">=" | b"<=")) => Some((i, i + 2)),
            (b'>' | b'<', _) => Some((i, i + 1)),
            _ => None,
        };
        found.is_some()
    });
    found
}

/// Strips leading binary-operator modifiers: `bool`, `on(...)`, `ignoring(...)`,
/// `group_left(...)`, `group_right(...)`.
fn strip_modifiers(mut expr: &str) -> &str {
    loop {
        expr = expr.trim_start();
        let Some(word_end) = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) else {
            return expr;
        };
        let word = &expr[..word_end];
        let rest = expr[word_end..].trim_start();
        match word {
            "bool" => expr = rest,
            "on" | "ignoring" | "group_left" | "group_right" => {
                if rest.starts_with('(') {
                    let Some(close) = rest.find(')') else {
                        return expr;
                    };
                    expr = &rest[close + 1..];
                } else {
                    expr = rest;
                }
            }
            _ => return expr,
        }
    }
}

/// `inner` if `expr` is exactly `prefix( inner )`: the parenthesis that closes at the end
/// is the one that opens after `prefix` (nothing of `(inner)` is outside it).
fn unwrap_call<'a>(expr: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = expr.strip_prefix(prefix)?.trim_start();
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    let mut outside = false;
    scan_top_level(rest, |_| {
        outside = true;
        true
    });
    (!outside).then_some(inner)
}

/// `vector(<number>)` or a number: a fallback or threshold, not a measurement.
fn is_constant(expr: &str) -> bool {
    let e = expr.trim();
    let inner = unwrap_call(e, "vector").unwrap_or(e).trim();
    inner.parse::<f64>().is_ok()
}

/// The measurements an alert condition is made of: an alert expression is a condition that
/// returns nothing while it is false, so "it returns data" cannot be asked of the whole.
/// The rule: split at top-level set operators (`and`, `or`, `unless`, dropping their `on`/
/// `ignoring` modifiers) and at the first top-level comparison (`==`, `!=`, `>=`, `<=`, `>`,
/// `<`, dropping `bool` and matching modifiers; PromQL binds comparisons tighter than set
/// operators, so this follows its precedence); unwrap `absent(x)` / `absent_over_time(x)`
/// to `x` and whole-expression parentheses; recurse. Every resulting operand that is not a
/// constant (`0`, `vector(0)`: thresholds and fallbacks) must return data. For example
/// `(sum(rate(a[5m])) or vector(0)) == 0 and on () max(b) > 0` requires
/// `sum(rate(a[5m]))` and `max(b)`.
fn measurements(expr: &str, out: &mut Vec<String>) {
    let e = expr.trim();
    let parts = split_set_operators(e);
    if parts.len() > 1 {
        for p in parts {
            measurements(strip_modifiers(p), out);
        }
        return;
    }
    if let Some((from, to)) = first_comparison(e) {
        measurements(&e[..from], out);
        measurements(strip_modifiers(&e[to..]), out);
        return;
    }
    for call in ["absent_over_time", "absent"] {
        if let Some(inner) = unwrap_call(e, call) {
            return measurements(inner, out);
        }
    }
    if let Some(inner) = unwrap_call(e, "") {
        return measurements(inner, out);
    }
    if !is_constant(e) && !out.iter().any(|o| o == e) {
        out.push(e.to_owned());
    }
}

#[test]
fn the_alert_condition_splitter_follows_promql_precedence() {
    let parts = |e: &str| {
        let mut out = Vec::new();
        measurements(e, &mut out);
        out
    };
    assert_eq!(
        parts("max by (topic, partition) (payrecon_commit_lag) > 50000"),
        ["max by (topic, partition) (payrecon_commit_lag)"]
    );
    assert_eq!(
        parts(
            "(sum(rate(payrecon_records_total[5m])) or vector(0)) == 0\n  and on ()\nmax(payrecon_commit_lag) > 0"
        ),
        [
            "sum(rate(payrecon_records_total[5m]))",
            "max(payrecon_commit_lag)"
        ]
    );
    assert_eq!(
        parts("absent(up{job=\"payrecon\"} == 1)"),
        ["up{job=\"payrecon\"}"]
    );
    assert_eq!(
        parts("sum(rate(x{s=\"e\"}[15m]))\n  /\nsum(rate(x[15m]))\n  > 0.05"),
        ["sum(rate(x{s=\"e\"}[15m]))\n  /\nsum(rate(x[15m]))"]
    );
    assert_eq!(
        parts("sum by (source) (rate(a[5m])) * 60 > bool on () group_left b"),
        ["sum by (source) (rate(a[5m])) * 60", "b"]
    );
    assert_eq!(parts("(a) + (b) >= 1"), ["(a) + (b)"]);
    assert_eq!(parts("sort_desc(x) > 1"), ["sort_desc(x)"]);
    assert_eq!(
        parts("x{a=~\"or|and\", b!=\"<\"} < 3"),
        ["x{a=~\"or|and\", b!=\"<\"}"]
    );
}

#[test]
fn the_rules_reader_handles_plain_quoted_continued_and_block_scalars() {
    let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0 # c\n        for: 1m\n      - alert: B\n        expr: |\n          sum(x)\n            > 1\n\n        labels:\n          a: b\n      - record: C\n        expr: \"y{a=\\\"b\\\"}\"\n      - expr: z\n          > 2\n        alert: D\n";
    assert_eq!(
        rule_expressions(yaml),
        [
            ("A".to_owned(), "up == 0".to_owned()),
            ("B".to_owned(), "sum(x)\n  > 1".to_owned()),
            ("C".to_owned(), "y{a=\"b\"}".to_owned()),
            ("D".to_owned(), "z > 2".to_owned()),
        ]
    );
    assert_eq!(rule_groups(yaml), BTreeSet::from(["g".to_owned()]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_service_and_every_dashboard_and_alert_expression_evaluates()
{
    let Some(binary) = prometheus_binary() else {
        if std::env::var("PAYRECON_SKIP_PROMETHEUS").as_deref() == Ok("1") {
            eprintln!("skipped: no prometheus executable on PATH (PAYRECON_SKIP_PROMETHEUS=1)");
            return;
        }
        panic!(
            "this test needs the prometheus server on PATH: apt-get install prometheus \
             (scripts/check-observability.sh installs it), or set PAYRECON_SKIP_PROMETHEUS=1"
        );
    };
    let started = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules_path = repo.join("prometheus/alerts.yml");
    let rules_yaml = std::fs::read_to_string(&rules_path).unwrap();

    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let options = SimulationOptions {
        malformed: 6,
        ..simulation(2_000, 2_001)
    };
    let (records, expected) =
        payrecon::tools::simulate::generate(&options, encoder.payment_schema_id()).unwrap();
    let service = fx.spawn_service("observability-prometheus", &[]);
    wait_for(
        Duration::from_secs(90),
        "the service to be ready",
        || async { http_status(service.metrics_port, "/health/ready").await == Some(200) },
    )
    .await;

    let prometheus = Prometheus::start(&binary, service.metrics_port, &rules_path);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let targets = prometheus.get("/api/v1/targets", &[]).await;
        let up = targets.as_ref().is_ok_and(|t| {
            t["data"]["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["labels"]["job"] == "payrecon" && a["health"] == "up")
        });
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the service: {targets:?}\n{}",
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("[prometheus] target up after {:?}", started.elapsed());

    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(180)).await;
    eprintln!(
        "[prometheus] {} records drained after {:?}",
        records.len(),
        started.elapsed()
    );
    // Prometheus has the final state, a few scrapes of history (rate() needs 2 samples in
    // its window) and every payrecon series has been scraped at least 3 times.
    let distinct =
        (expected.payment_events + expected.settlement_lines + expected.statement_lines) as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied = prometheus
            .value("sum(payrecon_records_total{outcome=\"applied\"})")
            .await;
        let dead = prometheus.value("sum(payrecon_dead_letters_total)").await;
        let scrapes = prometheus
            .value("count_over_time(up{job=\"payrecon\"}[5m])")
            .await;
        let fewest = prometheus.fewest_samples("payrecon_.+", "5m").await;
        if applied == Some(distinct)
            && dead == Some(expected.dead_letters as f64)
            && scrapes.is_some_and(|s| s >= 8.0)
            && fewest.is_some_and(|s| s >= 3)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not catch up: applied {applied:?} (expected {distinct}), dead letters {dead:?} (expected {}), scrapes {scrapes:?}, fewest samples of a payrecon series {fewest:?}\n{}",
            expected.dead_letters,
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Rules: every group loaded, every rule evaluated without error.
    let file_rules = rule_expressions(&rules_yaml);
    let file_groups = rule_groups(&rules_yaml);
    assert!(!file_rules.is_empty(), "no expr found in {rules_path:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let loaded = loop {
        let body = prometheus.get("/api/v1/rules", &[]).await.unwrap();
        let rules: Vec<Value> = body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated: {body}\n{}",
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut failures: Vec<String> = Vec::new();
    let groups = loaded["data"]["groups"].as_array().unwrap();
    let loaded_groups: BTreeSet<String> = groups
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect();
    if loaded_groups != file_groups {
        failures.push(format!(
            "rule groups loaded {loaded_groups:?} != groups of alerts.yml {file_groups:?}"
        ));
    }
    let mut loaded_names = Vec::new();
    for g in groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            let name = r["name"].as_str().unwrap_or("?").to_owned();
            if r["health"] != "ok" {
                failures.push(format!(
                    "rule {name} (group {}): health {} {}",
                    g["name"], r["health"], r["lastError"]
                ));
            }
            loaded_names.push(name);
        }
    }
    let mut file_names: Vec<String> = file_rules.iter().map(|(n, _)| n.clone()).collect();
    loaded_names.sort();
    file_names.sort();
    if loaded_names != file_names {
        failures.push(format!(
            "rules loaded by prometheus {loaded_names:?} != rules read from alerts.yml {file_names:?}"
        ));
    }

    // Dashboards: every Prometheus expression parses and returns data.
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(repo.join("grafana/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    dashboards.sort();
    let mut expressions = Vec::new();
    let mut variable_queries = Vec::new();
    let mut notes = Vec::new();
    for path in &dashboards {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let vars = dashboard_variables(&dashboard);
        let mut found = Vec::new();
        dashboard_expressions(path, &dashboard, &mut found);
        for (place, expr) in found {
            expressions.push((place, expr.clone(), substitute(&expr, &vars)));
        }
        variable_expressions(path, &dashboard, &mut variable_queries);
    }
    assert!(
        expressions.len() >= 10,
        "only {} dashboard expressions found: the extraction is broken",
        expressions.len()
    );
    for (place, raw, expr) in &expressions {
        if expr.contains('$') {
            failures.push(format!(
                "{place}: unresolved Grafana variable in `{raw}` (after substitution: `{expr}`)"
            ));
            continue;
        }
        match prometheus.query(expr).await {
            Ok(0) => failures.push(format!("{place}: empty result: `{expr}`")),
            Ok(_) => {}
            Err(e) => failures.push(format!("{place}: {e}: `{expr}`")),
        }
        // `x or vector(0)` always returns data; note (not fail) when `x` itself is empty.
        let parts = split_set_operators(expr);
        if parts.len() > 1 {
            for p in parts.iter().map(|p| strip_modifiers(p).trim()) {
                if !is_constant(p) && prometheus.query(p).await == Ok(0) {
                    notes.push(format!("{place}: `{p}` is empty (the fallback answers)"));
                }
            }
        }
    }
    for (place, expr) in &variable_queries {
        match prometheus.query(expr).await {
            Ok(0) => failures.push(format!("{place}: no value: `{expr}`")),
            Ok(_) => {}
            Err(e) => failures.push(format!("{place}: {e}: `{expr}`")),
        }
    }

    // Alerts: every expression parses; every measurement it compares returns data.
    let mut measured = 0;
    for (name, expr) in &file_rules {
        if let Err(e) = prometheus.query(expr).await {
            failures.push(format!("alert {name}: {e}: `{expr}`"));
            continue;
        }
        let mut parts = Vec::new();
        measurements(expr, &mut parts);
        if parts.is_empty() {
            failures.push(format!("alert {name}: no measurement found in `{expr}`"));
        }
        for part in parts {
            measured += 1;
            match prometheus.query(&part).await {
                Ok(0) => failures.push(format!(
                    "alert {name}: empty result for its measurement `{part}`"
                )),
                Ok(_) => {}
                Err(e) => failures.push(format!("alert {name}: {e}: `{part}`")),
            }
        }
    }
    eprintln!(
        "[prometheus] evaluated {} dashboard expressions, {} variable queries, {} alert rules ({measured} measurements) after {:?}",
        expressions.len(),
        variable_queries.len(),
        file_rules.len(),
        started.elapsed()
    );
    for n in &notes {
        eprintln!("[prometheus] note: {n}");
    }
    assert!(
        failures.is_empty(),
        "{} observability expression(s) failed against a real Prometheus:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    drop(prometheus);
    assert_eq!(
        service.terminate(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        fx.log_tail()
    );
}
