//! Start-up against a database that refuses or does not answer: a refusal retrying cannot fix
//! ends the command at once with the cause on its last line; an unreachable database ends a
//! command after `database.startup_timeout`; inspecting commands never migrate.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;

use crate::helpers::{admin_url, free_port, unique};

/// Runs `payrecon ARGS` against `url` with extra environment; returns the output and how long
/// it took.
fn payrecon(args: &[&str], url: &str, env: &[(&str, &str)]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(args)
        .env("PAYRECON_DATABASE__URL", url)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

fn server() -> String {
    let admin: PgConnectOptions = admin_url().parse().unwrap();
    format!("{}:{}", admin.get_host(), admin.get_port())
}

#[test]
fn migrate_against_a_missing_database_or_role_fails_at_once_naming_the_cause() {
    let cases = [
        (
            format!("postgres://postgres@{}/{}", server(), unique("no_such_db")),
            "the database does not exist",
        ),
        (
            format!(
                "postgres://{}@{}/postgres",
                unique("no_such_role"),
                server()
            ),
            "the role does not exist",
        ),
    ];
    for (url, cause) in cases {
        let (out, took) = payrecon(&["migrate"], &url, &[]);
        assert!(!out.status.success(), "{url}: must fail");
        assert!(took < Duration::from_secs(10), "{url}: took {took:?}");
        let last = last_line(&out);
        assert!(last.contains(cause), "{url}: last line {last}");
    }
}

#[test]
fn migrate_gives_up_on_an_unreachable_database_after_the_startup_timeout() {
    let url = format!("postgres://postgres@127.0.0.1:{}/payrecon", free_port());
    let (out, took) = payrecon(
        &["migrate"],
        &url,
        &[
            ("PAYRECON_DATABASE__STARTUP_TIMEOUT", "3s"),
            ("PAYRECON_DATABASE__CONNECT_TIMEOUT", "1s"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "took {took:?}"
    );
    let last = last_line(&out);
    assert!(last.contains("did not answer within"), "{last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_list_on_a_database_without_the_schema_refuses_and_creates_nothing() {
    let admin: PgConnectOptions = admin_url().parse().unwrap();
    let name = unique("payrecon_empty");
    payrecon::store::create_database(&admin, &name)
        .await
        .unwrap();
    let url = payrecon::store::database_url(&admin, &name);
    let (out, _) = payrecon(&["dead-letters", "list"], &url, &[]);
    assert!(!out.status.success());
    let last = last_line(&out);
    assert!(last.contains("run `payrecon migrate`"), "{last}");
    let pool = sqlx::PgPool::connect_with(admin.clone().database(&name))
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    payrecon::store::drop_database(&admin, &name).await.unwrap();
    assert_eq!(tables, 0, "the command must not have migrated the database");
}

/// GET `http://127.0.0.1:{port}{path}`: status and body, `None` while nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_health_and_metrics_while_it_waits_for_postgresql_and_stops_cleanly() {
    let db_port = free_port();
    let http_port = free_port();
    let url = format!("postgres://payrecon:Ready-Sekr1t@127.0.0.1:{db_port}/payrecon");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("run")
        .env("PAYRECON_DATABASE__URL", &url)
        .env("PAYRECON_DATABASE__CONNECT_TIMEOUT", "1s")
        .env("PAYRECON_PIPELINE__RETRY_MAX_BACKOFF", "500ms")
        .env("PAYRECON_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    // Served at once, although PostgreSQL never answers.
    let started = Instant::now();
    let live = loop {
        if let Some(answer) = get(http_port, "/health/live").await {
            break answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/health/live not served within 10 s:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(live.0, 200, "{live:?}");
    // Readiness says what start-up waits for, with the URL redacted, once the first attempt
    // has failed.
    let mut ready = (0, String::new());
    for _ in 0..50 {
        ready = get(http_port, "/health/ready").await.unwrap();
        if ready.1.contains("waiting for") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 503, "{ready:?}");
    assert!(
        ready.1.contains(&format!(
            "not ready: waiting for PostgreSQL at postgres://***@127.0.0.1:{db_port}/payrecon"
        )),
        "{ready:?}"
    );
    assert!(!ready.1.contains("Sekr1t"), "{ready:?}");
    let metrics = get(http_port, "/metrics").await.unwrap();
    assert_eq!(metrics.0, 200);
    assert!(
        metrics.1.contains("payrecon_dead_letters_total"),
        "{}",
        metrics.1
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting, not failed"
    );
    // SIGTERM while waiting: a clean stop.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 15 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("Sekr1t"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_with_a_registry_password_the_registry_refuses_ends_at_once_naming_the_registry() {
    let db = crate::helpers::TestDb::new().await;
    let gate =
        crate::registry_gate::Gate::start(&crate::registry_gate::basic("SR-KEY", "Right-Sekr1t"))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("registry-password");
    std::fs::write(&secret, "Wrong-Sekr1t\n").unwrap();
    let http_port = free_port().to_string();
    let secret_path = secret.display().to_string();
    let (out, took) = tokio::task::spawn_blocking(move || {
        payrecon(
            &["run"],
            &db.url.clone(),
            &[
                ("PAYRECON_REGISTRY__URL", &gate.url.clone()),
                ("PAYRECON_REGISTRY__USERNAME", "SR-KEY"),
                ("PAYRECON_REGISTRY__PASSWORD_FILE", &secret_path),
                ("PAYRECON_HTTP__LISTEN", &format!("127.0.0.1:{http_port}")),
            ],
        )
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let last = last_line(&out);
    assert!(
        last.contains("the schema registry at http://127.0.0.1:")
            && last.contains("refused the credentials (HTTP 401)"),
        "{last}"
    );
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!all.contains("Sekr1t"), "{all}");
}
