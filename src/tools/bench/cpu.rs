//! CPU time read from `/proc`: what the service process and the PostgreSQL server each spend
//! per record, so a throughput figure can be set against what two cores can give at all.
//!
//! The server's time is the postmaster's own, its reaped children's (a backend that exited is
//! added to the postmaster's `cutime`/`cstime` when it is reaped) and its live children's:
//! every backend, the WAL writer, the checkpointer, autovacuum. It is the whole server's, so a
//! figure is only the service's while nothing else uses the server; in the bench nothing does,
//! apart from the stage's own watch query. Nothing is measured when the server is not a process
//! on this machine (a remote URL, a container in its own PID namespace).

/// Clock ticks per second of the times in `/proc/<pid>/stat`.
fn ticks_per_sec() -> f64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: sysconf reads a constant of the running system; no memory is involved.
        #[allow(unsafe_code)]
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            return ticks as f64;
        }
    }
    100.0
}

/// The fields of `/proc/<pid>/stat` after the command name: state is field 0, ppid 1, utime
/// 11, stime 12, cutime 13, cstime 14 (proc(5) numbers them 3, 4, 14-17).
fn stat_fields(pid: u32) -> Option<(String, Vec<u64>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields = stat
        .get(close + 2..)?
        .split_whitespace()
        .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
        .collect::<Vec<_>>();
    (fields.len() > 14).then_some((comm, fields))
}

/// CPU seconds (user + system) process `pid` has used, all its threads.
pub fn process_secs(pid: u32) -> Option<f64> {
    let (_, f) = stat_fields(pid)?;
    Some((f[11] + f[12]) as f64 / ticks_per_sec())
}

/// The PostgreSQL server on this machine, found from one of its backends' pid
/// (`pg_backend_pid()`): the backend's parent, when both are `postgres` processes.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    postmaster: u32,
}

impl Server {
    pub fn of_backend(backend_pid: i32) -> Option<Server> {
        let backend = u32::try_from(backend_pid).ok()?;
        let (comm, f) = stat_fields(backend)?;
        if !comm.starts_with("postgres") {
            return None;
        }
        let postmaster = u32::try_from(f[1]).ok()?;
        let (comm, _) = stat_fields(postmaster)?;
        comm.starts_with("postgres")
            .then_some(Server { postmaster })
    }

    /// CPU seconds the server has used: the postmaster with its reaped children, and its
    /// live children.
    pub fn secs(&self) -> Option<f64> {
        let (_, own) = stat_fields(self.postmaster)?;
        let mut ticks = own[11] + own[12] + own[13] + own[14];
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, f)) = stat_fields(pid)
                && f[1] == u64::from(self.postmaster)
            {
                ticks += f[11] + f[12];
            }
        }
        Some(ticks as f64 / ticks_per_sec())
    }
}

/// CPU per record over one measured window, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PerRecord {
    pub service_us: f64,
    /// `None`: the server is not a process on this machine.
    pub postgres_us: Option<f64>,
}

impl PerRecord {
    /// The most records/s `cores` cores could give at these costs if nothing else ran (the
    /// broker included): `cores` seconds of CPU per second over the cost of one record.
    pub fn bound(&self, cores: usize) -> Option<f64> {
        let us = self.service_us + self.postgres_us?;
        (us > 0.0).then(|| cores as f64 * 1e6 / us)
    }
}

/// CPU readings at the start of a window.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    service: Option<f64>,
    server: Option<f64>,
}

pub fn mark(service_pid: u32, server: Option<Server>) -> Mark {
    Mark {
        service: process_secs(service_pid),
        server: server.and_then(|s| s.secs()),
    }
}

impl Mark {
    /// Per record of the `records` applied since this mark; `None` without `/proc`.
    pub fn per_record(
        &self,
        service_pid: u32,
        server: Option<Server>,
        records: i64,
    ) -> Option<PerRecord> {
        if records <= 0 {
            return None;
        }
        let service = process_secs(service_pid)? - self.service?;
        let postgres = match (server.and_then(|s| s.secs()), self.server) {
            (Some(now), Some(then)) => Some((now - then) * 1e6 / records as f64),
            _ => None,
        };
        Some(PerRecord {
            service_us: service * 1e6 / records as f64,
            postgres_us: postgres,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_cpu_and_a_non_postgres_pid_is_no_server() {
        let me = std::process::id();
        let before = process_secs(me).expect("/proc/self/stat");
        // Burn a little CPU so the reading moves.
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(120);
        while std::time::Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = process_secs(me).expect("/proc/self/stat");
        assert!(after > before, "{before} -> {after}");
        // The test binary is not a postgres backend.
        assert!(Server::of_backend(me as i32).is_none());
        assert!(Server::of_backend(-1).is_none());
    }

    #[test]
    fn the_bound_is_the_cores_over_the_cost_of_one_record() {
        let r = PerRecord {
            service_us: 15.0,
            postgres_us: Some(35.0),
        };
        assert_eq!(r.bound(2), Some(40_000.0));
        let remote = PerRecord {
            postgres_us: None,
            ..r
        };
        assert_eq!(remote.bound(2), None);
    }
}
