//! Who this process is, as recorded next to what it wrote (`committed_by`, `evaluated_by`,
//! the outbox relay's lease). A leaf: the service, the relay and replay all name themselves
//! with it.

/// `host/pid`: who committed a batch or evaluated an item.
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}", std::process::id())
}
