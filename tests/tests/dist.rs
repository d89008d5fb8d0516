//! The Debian package `cargo xtask dist` builds, taken apart: its files and their modes, its
//! control fields, its systemd units (`systemd-analyze verify`), its man pages (rendered) and
//! its completions (run in bash, fish and zsh). `cargo xtask test` builds the package first
//! and names it in `HOTSWAP_DEB`; without it these tests fail, they never pass by skipping.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The package under test.
fn deb() -> PathBuf {
    let deb = std::env::var_os("HOTSWAP_DEB").map(PathBuf::from).expect(
        "HOTSWAP_DEB is not set: build the package with `cargo xtask dist` and set HOTSWAP_DEB to \
         the .deb it prints (`cargo xtask test` does both)",
    );
    assert!(deb.is_file(), "HOTSWAP_DEB={} is not a file", deb.display());
    deb
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// Runs a command, which must succeed; returns its output.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// The package unpacked (`dpkg -x`) into a temporary directory.
fn extracted() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg").arg("-x").arg(deb()).arg(dir.path()));
    dir
}

/// The hotswap crate's version, from its Cargo.toml.
fn crate_version() -> String {
    let manifest = std::fs::read_to_string(repo().join("hotswap/Cargo.toml")).unwrap();
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("hotswap/Cargo.toml has a version")
        .to_owned()
}

/// The visible subcommands, as `hotswap --help` lists them, and theirs (`config check`), as
/// paths of words.
fn subcommands(hotswap: &Path, path: &[String]) -> Vec<Vec<String>> {
    let help = stdout(Command::new(hotswap).args(path).arg("--help"));
    let mut all = Vec::new();
    for name in help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A description that goes on over lines: those are indented further.
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
    {
        let mut sub = path.to_vec();
        sub.push(name.to_owned());
        all.extend(subcommands(hotswap, &sub));
        all.push(sub);
    }
    all
}

#[test]
fn the_package_holds_every_file_with_its_mode_and_its_control_fields() {
    let deb = deb();
    let dir = extracted();
    let root = dir.path();

    // `dpkg-deb -c`: every entry root-owned; the binary 0755, everything else 0644.
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut entries = std::collections::BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "odd dpkg-deb -c line: {line}");
        assert_eq!(fields[1], "root/root", "not root's: {line}");
        let path = fields[5].trim_start_matches('.').to_owned();
        entries.insert(path, fields[0].to_owned());
    }
    let hotswap = root.join("usr/bin/hotswap");
    let mut expected: Vec<(String, &str)> = vec![
        ("/usr/bin/hotswap".into(), "-rwxr-xr-x"),
        (
            "/usr/lib/systemd/system/hotswap.service".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/lib/systemd/system/hotswap@.service".into(),
            "-rw-r--r--",
        ),
        ("/etc/hotswap/hotswap.toml".into(), "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/hotswap".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_hotswap".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/hotswap.fish".into(),
            "-rw-r--r--",
        ),
        ("/usr/share/man/man1/hotswap.1.gz".into(), "-rw-r--r--"),
        ("/usr/share/doc/hotswap/copyright".into(), "-rw-r--r--"),
    ];
    let verbs = subcommands(&hotswap, &[]);
    for verb in ["daemon", "run", "upgrade", "rollback", "status", "bind"] {
        assert!(
            verbs.iter().any(|v| v == &[verb]),
            "`hotswap --help` lists no {verb}: {verbs:?}"
        );
    }
    for verb in &verbs {
        expected.push((
            format!("/usr/share/man/man1/hotswap-{}.1.gz", verb.join("-")),
            "-rw-r--r--",
        ));
    }
    for (path, mode) in &expected {
        assert_eq!(
            entries.get(path).map(String::as_str),
            Some(*mode),
            "{path} in the package, mode {mode}:\n{listing}"
        );
    }
    for (path, mode) in &entries {
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{path}");
        } else {
            assert!(
                expected.iter().any(|(p, _)| p == path),
                "{path} is in the package but not expected: update this test or the package"
            );
        }
    }
    // Hidden commands get no page.
    for hidden in ["keep", "generate"] {
        assert!(!entries.contains_key(&format!("/usr/share/man/man1/hotswap-{hidden}.1.gz")));
    }
    // What the repository says the files are.
    for (packaged, source) in [
        ("etc/hotswap/hotswap.toml", "dist/hotswap.toml"),
        (
            "usr/lib/systemd/system/hotswap.service",
            "dist/systemd/hotswap.service",
        ),
        (
            "usr/lib/systemd/system/hotswap@.service",
            "dist/systemd/hotswap@.service",
        ),
    ] {
        assert_eq!(
            std::fs::read_to_string(root.join(packaged)).unwrap(),
            std::fs::read_to_string(repo().join(source)).unwrap(),
            "{packaged} differs from {source}"
        );
    }

    // The control fields.
    let field = |name: &str| {
        stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_owned()
    };
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Package"), "hotswap");
    assert_eq!(field("Version"), crate_version());
    assert_eq!(field("Architecture"), arch.trim());
    for name in ["Maintainer", "Section", "Priority", "Description"] {
        assert!(!field(name).is_empty(), "no {name} field");
    }
    assert!(
        field("Depends").starts_with("libc6"),
        "Depends: {}",
        field("Depends")
    );
    // The configuration is a conffile, and the only one.
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(info.contains(" conffiles"), "no conffiles:\n{info}");
    let conffiles = stdout(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles, "/etc/hotswap/hotswap.toml\n");

    // The packaged binary runs.
    let version = stdout(Command::new(&hotswap).arg("--version"));
    assert_eq!(version.trim(), format!("hotswap {}", crate_version()));
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let dir = extracted();
    let root = dir.path();
    let units = root.join("usr/lib/systemd/system");
    // verify checks that ExecStart's binary exists and that the man pages in Documentation=
    // open: show it the package's own, by overlaying them on /usr/bin and the man pages in a
    // mount namespace of its own (the host's /usr/bin gets no hotswap). A unit that verify
    // finds anything to say about fails: it says nothing about a good one.
    let script = format!(
        "set -e
         mount --make-rprivate /
         mount -t overlay overlay -o lowerdir=/usr/bin:{root}/usr/bin /usr/bin
         mount -t overlay overlay -o lowerdir=/usr/share/man/man1:{root}/usr/share/man/man1 \
             /usr/share/man/man1
         systemd-analyze verify {units}/hotswap.service
         systemd-analyze verify {units}/hotswap@.service:hotswap@web.service",
        root = root.display(),
        units = units.display(),
    );
    let installed = Path::new("/usr/bin/hotswap").exists();
    let out = run(Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(&script));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify complains:\n{said}"
    );
    assert_eq!(
        Path::new("/usr/bin/hotswap").exists(),
        installed,
        "the overlay leaked into the host's /usr/bin"
    );
}

#[test]
fn the_man_pages_render() {
    let dir = extracted();
    let man1 = dir.path().join("usr/share/man/man1");
    for (page, says) in [
        ("hotswap.1.gz", "upgrade"),
        ("hotswap-upgrade.1.gz", "--ready"),
        ("hotswap-run.1.gz", "--listen"),
    ] {
        let out = run(Command::new("man")
            .arg("-l")
            .arg(man1.join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"));
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(says), "{page} does not say {says}:\n{text}");
        assert!(
            warnings.trim().is_empty(),
            "man warns about {page}:\n{warnings}"
        );
    }
}

/// Runs a shell's script; it must succeed and say nothing on stderr.
fn shell(program: &str, args: &[&str]) -> String {
    let out = run(Command::new(program).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "{program} {args:?} says:\n{stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completes_subcommands_and_options() {
    let dir = extracted();
    let script = dir
        .path()
        .join("usr/share/bash-completion/completions/hotswap");
    let complete = |words: &str| {
        let program = format!(
            r#"[ -f /usr/share/bash-completion/bash_completion ] && . /usr/share/bash-completion/bash_completion
               . '{script}'
               COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
               COMP_LINE="{words}"; COMP_POINT=${{#COMP_LINE}}
               _hotswap hotswap "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
               printf '%s\n' "${{COMPREPLY[@]}}""#,
            script = script.display(),
        );
        let out = shell("bash", &["-c", &program]);
        out.lines().map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(complete("hotswap up"), ["upgrade"]);
    assert!(complete("hotswap upgrade --rea").contains(&"--ready".to_owned()));
    // Hidden commands are not offered.
    assert!(complete("hotswap ge").iter().all(|w| w != "generate"));
    assert!(complete("hotswap ke").iter().all(|w| w != "keep"));
}

#[test]
fn fish_completes_subcommands_and_values() {
    let dir = extracted();
    let script = dir
        .path()
        .join("usr/share/fish/vendor_completions.d/hotswap.fish");
    let complete = |line: &str| {
        shell(
            "fish",
            &[
                "--no-config",
                "-c",
                &format!("source '{}'; complete -C '{line}'", script.display()),
            ],
        )
    };
    let upgrade = complete("hotswap up");
    assert!(
        upgrade.lines().any(|l| l.starts_with("upgrade\t")),
        "fish offers:\n{upgrade}"
    );
    let pass_fds = complete("hotswap run web --pass-fds ");
    for value in ["systemd\t", "nginx\t"] {
        assert!(
            pass_fds.lines().any(|l| l.starts_with(value)),
            "fish offers:\n{pass_fds}"
        );
    }
    let hidden = complete("hotswap ge");
    assert!(
        !hidden.lines().any(|l| l.starts_with("generate")),
        "fish offers:\n{hidden}"
    );
}

#[test]
fn zsh_loads_the_completion() {
    let dir = extracted();
    let script = dir.path().join("usr/share/zsh/vendor-completions/_hotswap");
    let script = script.to_str().unwrap();
    shell("zsh", &["-n", script]);
    // Loaded as compinit would (it defines _hotswap and registers it for hotswap).
    let out = shell(
        "zsh",
        &[
            "-f",
            "-c",
            &format!(
                "autoload -Uz compinit && compinit -u -D && source '{script}' && \
                 whence -w _hotswap && print -r -- $_comps[hotswap]"
            ),
        ],
    );
    assert_eq!(out, "_hotswap: function\n_hotswap\n", "zsh says:\n{out}");
}

/// README's "Under systemd" shows the units as they are: each block marked
/// `<!-- verbatim: FILE -->` must be FILE, and every unit block must be marked.
#[test]
fn readme_shows_the_units_as_they_are() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut shown = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if *line != "```ini" {
            continue;
        }
        let end = lines[i + 1..]
            .iter()
            .position(|l| *l == "```")
            .map(|n| i + 1 + n)
            .expect("README: an ```ini block that does not end");
        let block: String = lines[i + 1..end].iter().map(|l| format!("{l}\n")).collect();
        let marker = i
            .checked_sub(1)
            .and_then(|m| lines[m].strip_prefix("<!-- verbatim: "))
            .and_then(|m| m.strip_suffix(" -->"));
        let Some(file) = marker else {
            assert!(
                !block.contains("[Service]"),
                "README has a unit block without a `<!-- verbatim: FILE -->` line above it:\n{block}"
            );
            continue;
        };
        let content = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("README shows {file}: {e}"));
        assert_eq!(block, content, "README's block differs from {file}");
        shown.push(file.to_owned());
    }
    assert_eq!(
        shown,
        [
            "dist/systemd/hotswap.service",
            "dist/systemd/hotswap@.service"
        ]
    );
}
