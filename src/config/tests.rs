//! The settings as a whole: layering, secrets given as files, refused combinations.

use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_without_any_file() {
    let s = Settings::load_from(None, env(&[])).unwrap();
    assert_eq!(s.kafka.payments_topic, "payments.transactions");
    assert_eq!(s.pipeline.batch_linger, Duration::from_millis(20));
}

#[test]
fn environment_overrides_nested_keys() {
    let s = Settings::load_from(
        None,
        env(&[
            ("PAYRECON_KAFKA__GROUP_ID", "g2"),
            ("PAYRECON_PIPELINE__BATCH_LINGER", "1s"),
            ("PAYRECON_CONFIG", "ignored, not a setting"),
        ]),
    )
    .unwrap();
    assert_eq!(s.kafka.group_id, "g2");
    assert_eq!(s.pipeline.batch_linger, Duration::from_secs(1));
}

#[test]
fn a_bad_value_names_its_key() {
    let err = Settings::load_from(
        None,
        env(&[("PAYRECON_PIPELINE__BATCH_MAX_RECORDS", "many")]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch_max_records"), "{err}");
    let err = Settings::load_from(None, env(&[("PAYRECON_PIPELINE__BATCH_LINGER", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch_linger"), "{err}");
}

#[test]
fn an_unknown_key_is_rejected() {
    let err = Settings::load_from(None, env(&[("PAYRECON_KAFKA__BOOTSTRAP", "x")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bootstrap"), "{err}");
}

#[test]
fn protected_kafka_options_cannot_be_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[kafka.options]\n\"enable.auto.commit\" = \"true\"\n",
    )
    .unwrap();
    let err = Settings::load_from(Some(&path), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("enable.auto.commit"), "{err}");
}

#[test]
fn an_unparsable_database_url_is_named_but_not_shown() {
    let s = Settings::load_from(
        None,
        env(&[("PAYRECON_DATABASE__URL", "postgres://u:p@ss@h:notaport/db")]),
    )
    .unwrap();
    let err = s.database.connect_options().unwrap_err().to_string();
    assert!(err.contains("database.url"), "{err}");
    assert!(err.contains("postgres://***@h:notaport/db"), "{err}");
    assert!(!err.contains("p@ss") && !err.contains("ss@"), "{err}");
    assert!(!format!("{s:?}").contains("p@ss"));
}

#[test]
fn database_url_parameters_sqlx_does_not_know_are_dropped() {
    let s = Settings::load_from(
        None,
        env(&[(
            "PAYRECON_DATABASE__URL",
            "postgres://u@h:5433/db?sslpassword=x&application_name=ignored&sslmode=disable",
        )]),
    )
    .unwrap();
    let options = s.database.connect_options().unwrap();
    assert_eq!(options.get_port(), 5433);
    assert_eq!(options.get_database(), Some("db"));
}

#[test]
fn a_bad_kafka_option_is_refused_at_start_up_without_showing_its_value() {
    let dir = tempfile::tempdir().unwrap();
    for (key, fragment) in [("sasl.pasword", "sasl.pasword"), ("linger.ms", "linger.ms")] {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!("[kafka.options]\n\"{key}\" = \"Sekr1t-x\"\n"),
        )
        .unwrap();
        let err = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(fragment), "{err}");
        assert!(!err.contains("Sekr1t"), "{err}");
    }
}

#[test]
fn kafka_credentials_do_not_reach_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[kafka.options]\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"Sekr1t\"\n\
         \"ssl.key.password\" = \"Sekr1t\"\n",
    )
    .unwrap();
    let s = Settings::load_from(Some(&path), env(&[])).unwrap();
    let debug = format!("{s:?}");
    assert!(!debug.contains("Sekr1t"), "{debug}");
    assert!(debug.contains("\"svc\""), "{debug}");
}

/// Writes `content` to a file named `name` in `dir`; returns its path as a string.
fn secret_file(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

#[test]
fn secrets_given_as_files_replace_their_settings_without_the_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let url = secret_file(&dir, "url", b"postgres://u:F1le-Sekr1t@db:5432/p\n");
    let password = secret_file(&dir, "password", b"Reg-Sekr1t\r\n");
    let sasl = secret_file(&dir, "sasl", b"Sasl-Sekr1t \n");
    let s = Settings::load_from(
        None,
        env(&[
            ("PAYRECON_DATABASE__URL_FILE", &url),
            ("PAYRECON_REGISTRY__USERNAME", "key"),
            ("PAYRECON_REGISTRY__PASSWORD_FILE", &password),
            ("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &sasl),
        ]),
    )
    .unwrap();
    assert_eq!(
        s.database.url.expose_secret(),
        "postgres://u:F1le-Sekr1t@db:5432/p"
    );
    assert_eq!(
        s.registry.password.as_ref().unwrap().expose_secret(),
        "Reg-Sekr1t"
    );
    // Only the newline goes: a trailing space may be part of a password.
    assert_eq!(s.kafka.options["sasl.password"], "Sasl-Sekr1t ");
    assert_eq!(
        s.kafka.consumer_config().get("sasl.password"),
        Some("Sasl-Sekr1t ")
    );
    let debug = format!("{s:?}");
    assert!(!debug.contains("Sekr1t"), "{debug}");

    let token = secret_file(&dir, "token", b"Tok-Sekr1t\n");
    let s = Settings::load_from(None, env(&[("PAYRECON_REGISTRY__TOKEN_FILE", &token)])).unwrap();
    assert_eq!(
        s.registry.token.as_ref().unwrap().expose_secret(),
        "Tok-Sekr1t"
    );
}

#[test]
fn a_secret_given_both_as_a_value_and_as_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "f", b"x");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("PAYRECON_DATABASE__URL", "postgres://h/db"),
                ("PAYRECON_DATABASE__URL_FILE", &file),
            ],
            "database.url and database.url_file are both set",
        ),
        (
            &[
                ("PAYRECON_REGISTRY__USERNAME", "u"),
                ("PAYRECON_REGISTRY__PASSWORD", "p"),
                ("PAYRECON_REGISTRY__PASSWORD_FILE", &file),
            ],
            "registry.password and registry.password_file are both set",
        ),
        (
            &[
                ("PAYRECON_REGISTRY__TOKEN", "t"),
                ("PAYRECON_REGISTRY__TOKEN_FILE", &file),
            ],
            "registry.token and registry.token_file are both set",
        ),
    ];
    for (vars, message) in cases {
        let err = Settings::load_from(None, env(vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{err}");
    }
    // The default database.url is not "set": a file alone is fine.
    Settings::load_from(None, env(&[("PAYRECON_DATABASE__URL_FILE", &file)])).unwrap();
    // kafka.options."sasl.password" in a configuration file and the file variant.
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[kafka.options]\n\"sasl.password\" = \"p\"\n").unwrap();
    let err = Settings::load_from(
        Some(&config),
        env(&[("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &file)]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kafka.sasl_password_file are both set"),
        "{err}"
    );
}

#[test]
fn an_unreadable_secret_file_is_named_by_its_path_never_by_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file").display().to_string();
    let err = Settings::load_from(None, env(&[("PAYRECON_DATABASE__URL_FILE", &missing)]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read database.url_file") && err.contains(&missing),
        "{err}"
    );
    // Content that cannot be used is refused without being quoted.
    let binary = secret_file(&dir, "binary", b"Bin-Sekr1t\xff\xfe");
    let empty = secret_file(&dir, "empty", b"\n");
    for (var, path, what) in [
        (
            "PAYRECON_REGISTRY__TOKEN_FILE",
            &binary,
            "is not UTF-8 text",
        ),
        ("PAYRECON_REGISTRY__TOKEN_FILE", &empty, "is empty"),
    ] {
        let err = Settings::load_from(None, env(&[(var, path)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(path) && err.contains(what), "{err}");
        assert!(!err.contains("Sekr1t"), "{err}");
    }
    // A directory is not a file.
    let dir_path = dir.path().display().to_string();
    let err = Settings::load_from(
        None,
        env(&[("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &dir_path)]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kafka.sasl_password_file") && err.contains(&dir_path),
        "{err}"
    );
}

#[test]
fn a_variable_with_one_underscore_after_the_section_is_refused_with_the_right_name() {
    for (var, right) in [
        ("PAYRECON_DATABASE_URL_FILE", "PAYRECON_DATABASE__URL_FILE"),
        ("PAYRECON_DATABASE_URL", "PAYRECON_DATABASE__URL"),
        (
            "PAYRECON_REGISTRY_PASSWORD_FILE",
            "PAYRECON_REGISTRY__PASSWORD_FILE",
        ),
        (
            "PAYRECON_KAFKA_SASL_PASSWORD_FILE",
            "PAYRECON_KAFKA__SASL_PASSWORD_FILE",
        ),
    ] {
        let err = Settings::load_from(None, env(&[(var, "/run/secrets/x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(var) && err.contains(right), "{err}");
    }
    // Variables that name no setting are none of payrecon's business.
    Settings::load_from(
        None,
        env(&[
            ("PAYRECON_TEST_DATABASE_URL", "postgres://h/db"),
            ("PAYRECON_KAFKA_SOMETHING_ELSE", "x"),
            ("PAYRECON_CONFIG", "x"),
        ]),
    )
    .unwrap();
}

#[test]
fn static_membership_sets_group_instance_id_from_the_setting_or_the_pod_name() {
    let id = |vars: &[(&str, &str)]| {
        Settings::load_from(None, env(vars)).map(|s| {
            s.kafka
                .consumer_config()
                .get("group.instance.id")
                .map(str::to_owned)
        })
    };
    assert_eq!(
        id(&[("POD_NAME", "payrecon-0")]).unwrap(),
        None,
        "off by default"
    );
    let on = ("PAYRECON_KAFKA__STATIC_MEMBERSHIP", "true");
    assert_eq!(
        id(&[on, ("POD_NAME", "payrecon-1"), ("HOSTNAME", "h")]).unwrap(),
        Some("payrecon-1".into())
    );
    assert_eq!(
        id(&[on, ("HOSTNAME", "payrecon-2")]).unwrap(),
        Some("payrecon-2".into())
    );
    assert_eq!(
        id(&[
            on,
            ("PAYRECON_KAFKA__GROUP_INSTANCE_ID", "fixed"),
            ("POD_NAME", "p")
        ])
        .unwrap(),
        Some("fixed".into())
    );
    let err = id(&[on]).unwrap_err().to_string();
    assert!(err.contains("no group instance id"), "{err}");
    // An explicit id is an explicit choice: static membership without the switch.
    assert_eq!(
        id(&[("PAYRECON_KAFKA__GROUP_INSTANCE_ID", "payrecon-3")]).unwrap(),
        Some("payrecon-3".into())
    );
    let err = id(&[("PAYRECON_KAFKA__GROUP_INSTANCE_ID", " ")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("kafka.group_instance_id is empty"), "{err}");
    // Not through the pass-through options, where it would escape these rules.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[kafka.options]\n\"group.instance.id\" = \"x\"\n").unwrap();
    let err = Settings::load_from(Some(&config), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("group.instance.id"), "{err}");
}

#[test]
fn registry_settings_that_cannot_work_are_refused_and_secrets_never_shown() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("PAYRECON_REGISTRY__USERNAME", "u")],
            "needs both registry.username",
        ),
        (
            &[("PAYRECON_REGISTRY__PASSWORD", "Sekr1t")],
            "needs both registry.username",
        ),
        (
            &[
                ("PAYRECON_REGISTRY__USERNAME", "u"),
                ("PAYRECON_REGISTRY__PASSWORD", "Sekr1t"),
                ("PAYRECON_REGISTRY__TOKEN", "Sekr1t"),
            ],
            "one Authorization header",
        ),
        (
            &[("PAYRECON_REGISTRY__CERTIFICATE_LOCATION", "/c.pem")],
            "needs both registry.certificate_location and registry.key_location",
        ),
    ];
    for (vars, message) in cases {
        let err = Settings::load_from(None, env(vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{err}");
        assert!(!err.contains("Sekr1t"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let not_pem = secret_file(&dir, "ca.pem", b"not a certificate");
    let s = Settings::load_from(
        None,
        env(&[
            ("PAYRECON_REGISTRY__USERNAME", "u"),
            ("PAYRECON_REGISTRY__PASSWORD", "Sekr1t"),
            ("PAYRECON_REGISTRY__CA_LOCATION", &not_pem),
        ]),
    )
    .unwrap();
    assert!(!format!("{s:?}").contains("Sekr1t"));
    let err = s.registry.client().unwrap_err().to_string();
    assert!(
        err.contains("registry.ca_location") && err.contains(&not_pem),
        "{err}"
    );
    let mut s = s;
    s.registry.ca_location = Some(dir.path().join("missing.pem"));
    let err = s.registry.client().unwrap_err().to_string();
    assert!(err.contains("cannot read registry.ca_location"), "{err}");
}
