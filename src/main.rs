//! The `payrecon` binary: parse the command line and hand over to the library.

/// jemalloc instead of glibc's malloc, returning freed memory to the system within a second
/// (`malloc_conf` below). With glibc's arena per thread (tokio's workers, librdkafka's broker
/// threads) and jemalloc's default 10 s decay, the pages of batches already committed stayed
/// resident: 164-189 MiB peak for one instance under a backlog, 140.6-143.5 MiB with this
/// (`payrecon bench`, service-process stage; README *Speed*).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them): a background thread purges unused pages after 1 s, and two arenas
/// (the default is four per core, each keeping its own free pages). The one
/// `unsafe` of the crate: exporting a symbol by name is unsafe because two definitions would
/// clash at link time; this is the name tikv-jemalloc-sys documents for exactly this and
/// nothing else defines it.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:2\0";

fn main() -> std::process::ExitCode {
    payrecon::cli::main()
}
