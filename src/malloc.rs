//! glibc's malloc tuned for a process that allocates and frees batches, before the first
//! thread starts.
//!
//! Two of glibc's defaults keep freed batches resident. It gives threads that contend for the
//! heap arenas of their own (up to eight per core), and payrecon's threads (tokio workers,
//! librdkafka's broker and main threads, blocking tasks) allocate and free batches in turn,
//! so each arena keeps its own free memory. And it raises its mmap threshold to the size of
//! every large block freed (up to 32 MiB), so after the first batch its vectors and
//! librdkafka's fetch buffers come from those arenas instead of mappings returned on free.
//! [`tune`] caps the arenas at [`ARENA_MAX`] and fixes the threshold at [`MMAP_THRESHOLD`]
//! (`mallopt`), each unless the environment already chose it (`MALLOC_ARENA_MAX`,
//! `MALLOC_MMAP_THRESHOLD_`, or `glibc.malloc.arena_max` / `glibc.malloc.mmap_threshold` in
//! `GLIBC_TUNABLES`, which glibc applies itself). Other C libraries (musl) and systems are
//! left as they are.
//!
//! Measured with `payrecon bench`'s service-process stage on 2 cores (docs/performance.md, *The service's
//! own memory*): peak resident set 155-189 MiB with glibc's defaults, 134-151 MiB with two
//! arenas, 127-143 MiB with two arenas and the fixed threshold (interleaved with the defaults,
//! the service ran up to a few per cent slower, not settled by those runs); one arena:
//! 120-128 MiB, about a tenth less store-only throughput.

/// The arena cap set when the environment sets none.
pub const ARENA_MAX: i32 = 2;
/// Blocks from this size up are mapped on their own and returned to the system when freed.
pub const MMAP_THRESHOLD: i32 = 256 * 1024;

/// One glibc malloc parameter payrecon sets.
struct Parameter {
    /// The environment variable and the `GLIBC_TUNABLES` name that set it in glibc.
    variable: &'static str,
    tunable: &'static str,
    value: i32,
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    option: libc::c_int,
}

fn parameters() -> [Parameter; 2] {
    [
        Parameter {
            variable: "MALLOC_ARENA_MAX",
            tunable: "glibc.malloc.arena_max",
            value: ARENA_MAX,
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            option: libc::M_ARENA_MAX,
        },
        Parameter {
            variable: "MALLOC_MMAP_THRESHOLD_",
            tunable: "glibc.malloc.mmap_threshold",
            value: MMAP_THRESHOLD,
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            option: libc::M_MMAP_THRESHOLD,
        },
    ]
}

/// Whether the environment already chose `p` for glibc.
fn chosen_by_environment(
    p: &Parameter,
    variable: Option<std::ffi::OsString>,
    tunables: Option<&std::ffi::OsStr>,
) -> bool {
    variable.is_some()
        || tunables.is_some_and(|t| {
            (t.to_string_lossy().split(':')).any(|kv| kv.split('=').next() == Some(p.tunable))
        })
}

/// Sets the parameters the environment did not choose; to be called first in `main`, before
/// any thread exists (an arena cap only binds arenas not yet created). Returns what it set,
/// as `NAME=value` (empty: the environment chose everything, or this is not glibc).
pub fn tune() -> Vec<String> {
    let tunables = std::env::var_os("GLIBC_TUNABLES");
    parameters()
        .iter()
        .filter(|p| !chosen_by_environment(p, std::env::var_os(p.variable), tunables.as_deref()))
        .filter(|p| set(p))
        .map(|p| format!("{}={}", p.variable, p.value))
        .collect()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set(p: &Parameter) -> bool {
    // SAFETY: mallopt only stores a tuning value in glibc's malloc parameters; it takes no
    // pointers, and both options, with positive values, are documented ones.
    unsafe { libc::mallopt(p.option, p.value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_p: &Parameter) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::{chosen_by_environment, parameters};

    #[test]
    fn the_environment_s_choice_stands_whichever_way_it_is_spelled() {
        let [arenas, threshold] = parameters();
        let tunables = std::ffi::OsStr::new("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=3");
        assert!(!chosen_by_environment(&arenas, None, None));
        assert!(chosen_by_environment(&arenas, Some("4".into()), None));
        assert!(chosen_by_environment(&arenas, None, Some(tunables)));
        assert!(!chosen_by_environment(&threshold, None, Some(tunables)));
        let similar = std::ffi::OsStr::new("glibc.malloc.mmap_threshold_max=1");
        assert!(!chosen_by_environment(&threshold, None, Some(similar)));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_both_parameters() {
        for p in parameters() {
            assert!(super::set(&p), "{}", p.variable);
        }
    }
}
