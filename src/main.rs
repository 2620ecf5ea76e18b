use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keywarden::cli::main(keywarden::cli::Cli::parse())
}
