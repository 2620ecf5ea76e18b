use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc/free took about a third of the daemon's CPU under load
/// (BENCHMARKS.md, "Profile and fixes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    forbid_core_dumps();
    keywarden::cli::main(keywarden::cli::Cli::parse())
}

/// The process holds plaintext DEKs and root-key material in memory: a core dump
/// would write them to disk. PR_SET_DUMPABLE 0 stops dumps (and ptrace by
/// non-root users) for the whole process.
fn forbid_core_dumps() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integer arguments and
    // touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        eprintln!("keywarden: warning: cannot disable core dumps: {}", std::io::Error::last_os_error());
    }
}
