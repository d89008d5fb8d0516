//! `hotswap generate` (hidden): shell completions and man pages from the clap definitions, for
//! the package (`cargo xtask dist`) — so they always say what this binary takes.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

/// completions <bash|zsh|fish> | man <DIR>.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Print the completion script for a shell.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write hotswap.1 and hotswap-<command>.1 for each visible subcommand into DIR.
    Man { dir: PathBuf },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cmd = super::Cli::command();
    match args.what {
        What::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            let mut cmd = without_hidden(cmd);
            if shell == clap_complete::Shell::Fish {
                cmd = fish_safe(cmd);
            }
            clap_complete::generate(shell, &mut cmd, "hotswap", &mut script);
            out!(
                "{}",
                String::from_utf8(script).context("completion script is not UTF-8")?
            );
            Ok(())
        }
        What::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))
        }
    }
}

/// The command line without its hidden subcommands (`keep`, `generate`): clap_complete offers
/// them otherwise. Completions need only the arguments and the subcommands.
fn without_hidden(cmd: clap::Command) -> clap::Command {
    let mut visible = clap::Command::new("hotswap")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = cmd.get_about() {
        visible = visible.about(about.clone());
    }
    visible
}

/// The command line with no `"` in its possible values' help: clap_complete puts that help
/// into a double-quoted fish string without escaping it (`--pass-fds nginx` says
/// `NGINX="3;4;"`), and fish then refuses the whole script. Only the completions see this.
fn fish_safe(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        let values = arg.get_possible_values();
        let quoted = |v: &clap::builder::PossibleValue| {
            v.get_help().is_some_and(|h| h.to_string().contains('"'))
        };
        if !values.iter().any(quoted) {
            return arg;
        }
        let values = values.into_iter().map(|v| match v.get_help() {
            Some(help) => {
                let help = help.to_string().replace('"', "'");
                v.help(help)
            }
            None => v,
        });
        arg.value_parser(clap::builder::PossibleValuesParser::new(values))
    })
    .mut_subcommands(fish_safe)
}
