//! Secrets never reach a log line or an error message, whatever the shape of the URL that
//! carries them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::free_port;

/// Runs `payrecon` with `args` and `env` until it exits or `limit` passes (then kills it),
/// and returns everything it wrote to stdout and stderr.
fn run_bounded(args: &[&str], env: &[(&str, &str)], limit: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    // `migrate` retries an unreachable database until stopped (start-up is another issue's
    // subject): the test bounds it instead.
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap()
}

#[test]
fn a_database_password_with_an_at_sign_appears_nowhere_in_the_output_of_a_failing_migrate() {
    // Nothing listens on the port: every attempt fails and is logged (with the URL).
    let url = format!(
        "postgres://payrecon:Tr0ub@dor-Sekr1t@127.0.0.1:{}/payrecon?sslmode=disable&sslpassword=Ssl-Sekr1t",
        free_port()
    );
    let output = run_bounded(
        &["migrate"],
        &[
            ("PAYRECON_DATABASE__URL", &url),
            ("PAYRECON_DATABASE__CONNECT_TIMEOUT", "1s"),
            ("PAYRECON_PIPELINE__RETRY_MAX_BACKOFF", "200ms"),
        ],
        Duration::from_secs(4),
    );
    for secret in ["Tr0ub", "dor-Sekr1t", "Sekr1t"] {
        assert!(
            !output.contains(secret),
            "{secret:?} leaked into the output:\n{output}"
        );
    }
    // The attempts were logged, with the URL redacted: the test saw the lines it guards.
    assert!(
        output.contains("cannot connect to PostgreSQL")
            && output.contains("postgres://***@127.0.0.1:"),
        "{output}"
    );
    assert!(
        output.contains("sslpassword"),
        "the dropped key is named: {output}"
    );
}

#[test]
fn an_unparsable_database_url_is_refused_without_showing_its_password() {
    let output = run_bounded(
        &["migrate"],
        &[(
            "PAYRECON_DATABASE__URL",
            "postgres://payrecon:Tr0ub@dor@127.0.0.1:notaport/payrecon",
        )],
        Duration::from_secs(10),
    );
    assert!(output.contains("database.url"), "{output}");
    for secret in ["Tr0ub", "dor@"] {
        assert!(!output.contains(secret), "{secret:?} leaked:\n{output}");
    }
}
