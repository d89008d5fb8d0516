//! The Kubernetes manifests in `deploy/kubernetes/`: each passes a strict schema check
//! (kubernetes-validate, which `cargo xtask test` installs and names in
//! `HOTSWAP_KUBE_VALIDATE`), the check does reject a broken manifest, and every hotswap command
//! line in them (container entry points, exec probes) is one the real `hotswap` accepts.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use integration_tests::hotswap_bin;

/// The Kubernetes versions checked against: the oldest the manifests are written for
/// (`appArmorProfile` came in 1.30, native sidecars in 1.29) and the newest the validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn validator() -> PathBuf {
    let path = std::env::var_os("HOTSWAP_KUBE_VALIDATE").map(PathBuf::from).expect(
        "HOTSWAP_KUBE_VALIDATE is not set: run the tests with `cargo xtask test`, which installs \
         kubernetes-validate and names it there",
    );
    assert!(
        path.exists(),
        "HOTSWAP_KUBE_VALIDATE names {}, which does not exist",
        path.display()
    );
    path
}

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("deploy/kubernetes")
}

/// Every `*.yaml` in deploy/kubernetes/, sorted.
fn manifests() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .expect("reading deploy/kubernetes")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    found.sort();
    for expected in ["daemonset.yaml", "pod-fallback.yaml"] {
        assert!(
            found.iter().any(|p| p.ends_with(expected)),
            "deploy/kubernetes/{expected} is missing (found {found:?})"
        );
    }
    found
}

fn validate(manifest: &Path, version: &str) -> Output {
    Command::new(validator())
        .args(["--strict", "--kubernetes-version", version])
        .arg(manifest)
        .output()
        .expect("running kubernetes-validate")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn every_manifest_passes_the_strict_schema_check() {
    for manifest in manifests() {
        for version in KUBERNETES_VERSIONS {
            let output = validate(&manifest, version);
            let said = text(&output);
            println!("{said}");
            assert!(
                output.status.success(),
                "{} fails the schema check for Kubernetes {version}:\n{said}",
                manifest.display()
            );
            assert!(said.contains("passed"), "no resource was checked: {said}");
        }
    }
}

#[test]
fn the_strict_check_rejects_a_misspelled_field_and_a_wrong_type() {
    let original =
        std::fs::read_to_string(manifest_dir().join("daemonset.yaml")).expect("daemonset.yaml");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("writing a manifest");
        path
    };
    // The copy itself passes: what fails below is the edit.
    let copy = write("copy.yaml", &original);
    let output = validate(&copy, KUBERNETES_VERSIONS[0]);
    assert!(output.status.success(), "{}", text(&output));

    let broken = [
        (
            "misspelled.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "readOnlyRootFileSystem",
        ),
        (
            "wrong-type.yaml",
            "containerPort: 9464",
            "containerPort: \"9464\"",
            "is not of type 'integer'",
        ),
    ];
    for (name, from, to, expected) in broken {
        assert_eq!(
            original.matches(from).count(),
            1,
            "{from:?} in daemonset.yaml"
        );
        let path = write(name, &original.replace(from, to));
        for version in KUBERNETES_VERSIONS {
            let output = validate(&path, version);
            let said = text(&output);
            println!("{name}, Kubernetes {version}: {said}");
            assert!(
                !output.status.success(),
                "{name} ({to}) passed the schema check for Kubernetes {version}:\n{said}"
            );
            assert!(
                said.contains(expected),
                "{name}: the refusal does not say {expected:?}:\n{said}"
            );
        }
    }
}

/// The manifest's documents as JSON, parsed by the validator's own Python (it has PyYAML).
fn documents(manifest: &Path) -> Vec<serde_json::Value> {
    let python = validator()
        .parent()
        .expect("the validator's directory")
        .join("python3");
    let output = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(manifest)
        .output()
        .expect("running the validator's python3");
    assert!(output.status.success(), "{}", text(&output));
    serde_json::from_slice(&output.stdout).expect("JSON from PyYAML")
}

/// Every command line in a pod spec: each container's (init containers included) command and
/// args, and each exec probe's command.
fn command_lines(pod: &serde_json::Value, found: &mut Vec<(String, Vec<String>)>) {
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|s| s.as_str().expect("a string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for list in ["initContainers", "containers"] {
        for container in pod[list].as_array().into_iter().flatten() {
            let name = container["name"].as_str().unwrap_or("?").to_owned();
            let mut line = strings(&container["command"]);
            line.extend(strings(&container["args"]));
            if !line.is_empty() {
                found.push((name.clone(), line));
            }
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let exec = strings(&container[probe]["exec"]["command"]);
                if !exec.is_empty() {
                    found.push((format!("{name} {probe}"), exec));
                }
            }
        }
    }
}

#[test]
fn every_hotswap_command_line_in_the_manifests_is_accepted_by_hotswap() {
    let hotswap = hotswap_bin();
    let mut checked = 0;
    for manifest in manifests() {
        let mut lines = Vec::new();
        for document in documents(&manifest) {
            match document["kind"].as_str() {
                Some("Pod") => command_lines(&document["spec"], &mut lines),
                Some("DaemonSet" | "Deployment" | "StatefulSet") => {
                    command_lines(&document["spec"]["template"]["spec"], &mut lines)
                }
                _ => {}
            }
        }
        for (what, line) in lines {
            if !line[0].ends_with("/hotswap") && line[0] != "hotswap" {
                continue;
            }
            let words = &line[1..];
            let subcommand = words.first().expect("a hotswap subcommand");
            // Options are what comes before `--` (after it: the server's command line).
            let options: Vec<&String> = words.iter().take_while(|w| w.as_str() != "--").collect();
            // 1. Each option is one the subcommand's help names.
            let help = Command::new(&hotswap)
                .args([subcommand.as_str(), "--help"])
                .output()
                .expect("running hotswap --help");
            let help_text = text(&help);
            assert!(
                help.status.success(),
                "hotswap {subcommand} --help: {help_text}"
            );
            let missing: Vec<&str> = options
                .iter()
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split('=').next().unwrap_or(w))
                .filter(|flag| {
                    !help_text
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .any(|word| word == *flag)
                })
                .collect();
            assert!(
                missing.is_empty(),
                "{}: {what}: `hotswap {subcommand}` has no {missing:?} (its --help:\n{help_text})",
                manifest.display()
            );
            // 2. The whole line parses, values included: with --help before the server's
            // command, hotswap parses every option, then prints its help instead of running.
            let output = Command::new(&hotswap)
                .args(&options)
                .arg("--help")
                .output()
                .expect("running hotswap");
            assert!(
                output.status.success(),
                "{}: {what}: hotswap refuses {line:?}: {}",
                manifest.display(),
                text(&output)
            );
            println!("{}: {what}: {line:?}: accepted", manifest.display());
            checked += 1;
        }
    }
    // The daemon (DaemonSet and sidecar), the supervisor and the three exec probes.
    assert!(checked >= 5, "only {checked} hotswap command lines found");
}
