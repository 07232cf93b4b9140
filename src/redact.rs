//! Keeping secrets out of text that may be printed: connection strings, error messages and
//! their causes. A leaf: it imports nothing of the crate, so configuration, the codec and the
//! command line can all use it.

/// Whether the value of parameter `key` is a credential (`password`, `sslpassword`, `pass`,
/// `passwd`, `pwd`, `*_secret`, `*_token`...). Erring towards "yes": redacting a harmless
/// value costs a less helpful log line, missing a secret costs a leak.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "passwd", "password", "pwd", "secret", "token"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// Replaces the value of every secret `key=value` pair (URL query parameters and libpq
/// `key=value` strings alike, see [`is_secret_key`]) with `***`. A value ends at whitespace,
/// and in a URL (`url_query`) also at `&`; a value in single quotes (libpq) ends at the
/// closing quote, backslash escapes included.
fn redact_secret_parameters(s: &str, url_query: bool) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || "_-.[]".contains(c);
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let before = &rest[..eq];
        let key_end = before.trim_end().len();
        let key_start = before[..key_end]
            .rfind(|c: char| !is_key_char(c))
            .map_or(0, |i| {
                i + before[i..].chars().next().map_or(1, char::len_utf8)
            });
        let key = &before[key_start..key_end];
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if key.is_empty() || !is_secret_key(key) {
            continue;
        }
        let value = rest.trim_start();
        out.push_str(&rest[..rest.len() - value.len()]);
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted.char_indices().find_map(|(i, c)| {
                let end = !escaped && c == '\'';
                escaped = !escaped && c == '\\';
                end.then_some(i)
            });
            close.map_or(value.len(), |i| i + 2)
        } else {
            value
                .find(|c: char| c.is_whitespace() || (url_query && c == '&'))
                .unwrap_or(value.len())
        };
        out.push_str("***");
        rest = &value[len..];
    }
    out.push_str(rest);
    out
}

/// A connection string safe to log: credentials replaced by `***`, whatever the string's
/// shape. Passwords may hold `@`, `:`, `/`, `?` or `#` unencoded, so no attempt is made to
/// find where a well-formed URL's password ends:
/// - with a scheme: everything between `://` and the *last* `@` goes, user name included
///   (`postgres://u:p@ss@host/db` is `postgres://***@host/db`);
/// - without a scheme: everything up to the last `@` (`u:secret@host` is `***@host`), unless
///   it reads as a libpq `key=value` string (where `@` may be part of a user name);
/// - everywhere: the value of `password=`, `sslpassword=`, `pass=` and the like.
///
/// It over-redacts rather than under-redacts: an `@` later in the query also hides the host.
pub fn redact_url(url: &str) -> String {
    let has_scheme = url.contains("://");
    let s = redact_secret_parameters(url, has_scheme);
    if let Some((scheme, rest)) = s.split_once("://") {
        return match rest.rfind('@') {
            Some(at) => format!("{scheme}://***{}", &rest[at..]),
            None => s,
        };
    }
    let keyword_form = s.contains('=');
    match s.rfind('@') {
        Some(at) if !keyword_form => format!("***{}", &s[at..]),
        _ => s,
    }
}

/// Free text (an error message from a driver or an HTTP client) with every URL's credentials
/// and every secret `key=value` redacted. URLs inside text are found by their `://`; the
/// credentials of each end at the last `@` before the next whitespace (clients print URLs
/// serialized, with spaces percent-encoded).
pub fn redact_text(text: &str) -> String {
    let s = redact_secret_parameters(text, true);
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let token_end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        match tail[..token_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// An error and its sources, `: `-separated (reqwest's own message omits the causes).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_survives_redaction_whatever_the_url_looks_like() {
        // (input, secrets that must not appear, what must still be there)
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "postgres://u:s3cret@h:5432/db?sslmode=require",
                &["s3cret"],
                "@h:5432/db?sslmode=require",
            ),
            ("postgres://u:p@ss@host/db", &["p@ss", "ss@"], "@host/db"),
            (
                "postgres://u:pa:ss:wd@host/db",
                &["pa:ss", "ss:wd"],
                "@host/db",
            ),
            ("postgres://u:pa/ss@host/db", &["pa/ss", "ss@"], "@host/db"),
            ("postgres://u:pa?ss@host/db", &["pa?ss", "ss@"], "@host/db"),
            ("postgres://u:pa#ss@host/db", &["pa#ss", "ss@"], "@host/db"),
            (
                "postgres://u:p%40ss%2Fw@host/db",
                &["p%40ss", "ss%2Fw"],
                "@host/db",
            ),
            (
                "postgres://u:v6secret@[::1]:5432/db",
                &["v6secret"],
                "@[::1]:5432/db",
            ),
            ("postgres://justauser@h/db", &[], "@h/db"),
            ("u:nosch3me@h:5432/db", &["nosch3me"], "@h:5432/db"),
            (
                "host=h user=u password=kw-secret dbname=d",
                &["kw-secret"],
                "host=h",
            ),
            (
                "host=h password='quo ted\\' secret' port=5",
                &["quo", "ted", "secret'"],
                "port=5",
            ),
            ("host=h password = spaced dbname=d", &["spaced"], "dbname=d"),
            (
                "postgres://h/db?sslmode=require&password=qu3ry&application_name=a",
                &["qu3ry"],
                "application_name=a",
            ),
            (
                "postgres://h/db?sslpassword=ssl-s3cret",
                &["ssl-s3cret"],
                "sslpassword=***",
            ),
            (
                "http://h/?pass=p1&pwd=p2&api_token=p3",
                &["p1", "p2", "p3"],
                "http://h/",
            ),
            (
                "postgres://u:p@ss@h/db?password=a@b",
                &["p@ss", "ss@", "a@b"],
                "@h/db",
            ),
            (
                "::not a url at all:: user:g@rbage@",
                &["user:g", "rbage"],
                "***@",
            ),
            ("not a url, no credential", &[], "not a url, no credential"),
            (
                "SASL_SSL://svc:k4fka@broker1:9092,broker2:9092",
                &["k4fka"],
                "broker2:9092",
            ),
        ];
        for (input, secrets, kept) in cases {
            let out = redact_url(input);
            for secret in *secrets {
                assert!(
                    !out.contains(secret),
                    "{input:?} -> {out:?} leaks {secret:?}"
                );
            }
            assert!(out.contains(kept), "{input:?} -> {out:?} lost {kept:?}");
            if !secrets.is_empty() {
                assert_ne!(
                    &out, input,
                    "a credential form must never come back unchanged"
                );
            }
        }
    }

    #[test]
    fn urls_inside_error_messages_lose_their_credentials() {
        let message = "error sending request for url (https://key:p@ss)w0rd@registry:8081/schemas/ids/1): \
                       connection refused; retry password=plain";
        let out = redact_text(message);
        for secret in ["key", "p@ss", "ss)w0rd", "plain"] {
            assert!(!out.contains(secret), "{out} leaks {secret}");
        }
        assert!(
            out.contains("https://***@registry:8081/schemas/ids/1)"),
            "{out}"
        );
        assert_eq!(redact_text("no url in here"), "no url in here");
    }
}
