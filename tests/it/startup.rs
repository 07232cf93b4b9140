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
