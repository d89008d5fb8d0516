//! The declarative config file (`/etc/hotswap/hotswap.toml`): the services, their bindings and
//! their owners, applied when the daemon starts and on `hotswap reload` (or SIGHUP) as a diff.
//!
//! ```toml
//! [[service]]
//! name = "web"
//! owner = "www-data"      # optional: a user who may manage it without root (or group = "ops")
//! bind = ["tcp 0.0.0.0/0 80", "tcp ::/0 80"]
//! ```
//!
//! [`Config::parse`] checks all of a file before anything is applied, so a broken file changes
//! nothing and its error says the line and column. [`apply`] then makes the registry match:
//! the config owns the services it names (their bindings become exactly the listed ones, and
//! their owner the one given), and the bindings it applied before to a service it no longer
//! names are removed; a service whose bindings and owner are unchanged is not touched, so none
//! of its connections notices. A change that fails part-way is undone, so a reload happens
//! whole or not at all.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    access::{group_id, user_id, LookupError, Owner},
    model::{Binding, ParseError, ServiceName},
    registry::{Registry, RegistryError},
    PathError,
};

/// Where the daemon reads its config when `--config` does not say.
pub const DEFAULT_PATH: &str = "/etc/hotswap/hotswap.toml";

/// The largest config file read: far more than any host needs, small enough to hold.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// What the config says of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// Who besides root may manage it (nobody: root alone).
    pub owner: Owner,
    /// The addresses steered to it.
    pub bindings: BTreeSet<Binding>,
}

/// A config file, checked: every name, binding and owner is valid, no binding is claimed
/// twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The services, by name.
    pub services: BTreeMap<ServiceName, ServiceConfig>,
}

/// The file as written, with where each value is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    service: Vec<ServiceText>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceText {
    name: Spanned<String>,
    #[serde(default)]
    owner: Option<Spanned<String>>,
    #[serde(default)]
    group: Option<Spanned<String>>,
    #[serde(default)]
    bind: Vec<Spanned<String>>,
}

/// A config file that cannot be used; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] PathError),
    /// The file is larger than any config needs.
    #[error("{} is larger than {MAX_FILE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Something in the file is wrong, at a line and column (both from 1).
    #[error("{}:{line}:{column}: {problem}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// Line.
        line: usize,
        /// Column, in characters.
        column: usize,
        /// What is wrong.
        #[source]
        problem: Problem,
    },
}

/// What is wrong at a place in a config file.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Not TOML, or not the shape of a config (an unknown key, a wrong type).
    #[error("{0}")]
    Syntax(String),
    /// A service name or binding that does not parse.
    #[error(transparent)]
    Invalid(#[from] ParseError),
    /// A user or group this host lacks.
    #[error(transparent)]
    Owner(#[from] LookupError),
    /// An owner for a service with no binding (a service exists through its bindings).
    #[error("service {0} has an owner but no binding: give it a binding, or no owner")]
    OwnerWithoutBinding(ServiceName),
    /// A service named twice.
    #[error("service {0} is named twice")]
    DuplicateService(ServiceName),
    /// A binding listed twice, for one service or two.
    #[error("{binding} is bound to service {first} already")]
    DuplicateBinding {
        /// The binding.
        binding: Binding,
        /// The service that lists it first.
        first: ServiceName,
    },
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let file = std::fs::File::open(path).map_err(PathError::at("reading", path))?;
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(PathError::at("reading", path))?;
        if text.len() as u64 > MAX_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text, path)
    }

    /// Checks `text`, read from `path` (for the errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let at = |span: Range<usize>, problem: Problem| {
            let (line, column) = line_and_column(text, span.start);
            ConfigError::At {
                path: path.to_owned(),
                line,
                column,
                problem,
            }
        };
        let file: FileText = toml::from_str(text).map_err(|err| {
            at(
                err.span().unwrap_or(0..0),
                Problem::Syntax(err.message().to_owned()),
            )
        })?;
        let mut config = Config::default();
        let mut claimed: BTreeMap<Binding, ServiceName> = BTreeMap::new();
        for service in file.service {
            let name: ServiceName = service
                .name
                .get_ref()
                .parse()
                .map_err(|e: ParseError| at(service.name.span(), e.into()))?;
            if config.services.contains_key(&name) {
                return Err(at(service.name.span(), Problem::DuplicateService(name)));
            }
            if service.bind.is_empty() {
                // A service exists through its bindings: an owner given to none would be lost.
                if let Some(given) = service.owner.as_ref().or(service.group.as_ref()) {
                    return Err(at(given.span(), Problem::OwnerWithoutBinding(name)));
                }
            }
            let owner = Owner {
                uid: service
                    .owner
                    .map(|user| user_id(user.get_ref()).map_err(|e| at(user.span(), e.into())))
                    .transpose()?,
                gid: service
                    .group
                    .map(|group| group_id(group.get_ref()).map_err(|e| at(group.span(), e.into())))
                    .transpose()?,
            };
            let mut bindings = BTreeSet::new();
            for text in &service.bind {
                let binding: Binding = text
                    .get_ref()
                    .parse()
                    .map_err(|e: ParseError| at(text.span(), e.into()))?;
                if let Some(first) = claimed.insert(binding, name.clone()) {
                    return Err(at(
                        text.span(),
                        Problem::DuplicateBinding { binding, first },
                    ));
                }
                bindings.insert(binding);
            }
            config
                .services
                .insert(name, ServiceConfig { owner, bindings });
        }
        Ok(config)
    }
}

/// Line and column (from 1, in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

/// One change [`apply`] made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A binding now steers to the service.
    Bound {
        /// Service.
        service: ServiceName,
        /// Binding.
        binding: Binding,
    },
    /// A binding no longer steers to the service.
    Unbound {
        /// Service.
        service: ServiceName,
        /// Binding.
        binding: Binding,
    },
    /// The service has a new owner.
    Owned {
        /// Service.
        service: ServiceName,
        /// Its owner now.
        owner: Owner,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bound { service, binding } => write!(f, "bound {binding} to service {service}"),
            Self::Unbound { service, binding } => {
                write!(f, "unbound {binding} from service {service}")
            }
            Self::Owned { service, owner } => write!(f, "service {service} is owned by {owner}"),
        }
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The changes, in the order made.
    pub changes: Vec<Change>,
    /// Services the config names that needed no change.
    pub unchanged: Vec<ServiceName>,
}

/// A change to the registry failed; every change made before it was undone.
#[derive(Debug, thiserror::Error)]
#[error("the config could not be applied (nothing of it was): {change} failed")]
pub struct ApplyError {
    /// The change that failed, as it would have read.
    pub change: Box<Change>,
    /// Why.
    #[source]
    pub source: RegistryError,
}

/// Makes `registry` match `desired`; `applied` is the config applied before (its bindings to
/// services `desired` no longer names are removed). Whole or nothing.
pub fn apply(
    registry: &mut Registry,
    desired: &Config,
    applied: &Config,
) -> Result<Applied, ApplyError> {
    let status = registry.status();
    let current: BTreeMap<&ServiceName, (Owner, BTreeSet<Binding>)> = status
        .services
        .iter()
        .map(|s| (&s.name, (s.owner, s.bindings.iter().copied().collect())))
        .collect();
    let has_generations = |name: &ServiceName| {
        status
            .services
            .iter()
            .any(|s| &s.name == name && !s.generations.is_empty())
    };
    let empty = (Owner::default(), BTreeSet::new());
    let mut plan = Vec::new();
    // Removals first, so a binding that moves between services is free when it is added.
    for (name, was) in &applied.services {
        if desired.services.contains_key(name) {
            continue;
        }
        let (owner, bound) = current.get(name).unwrap_or(&empty);
        for binding in was.bindings.intersection(bound) {
            plan.push(Change::Unbound {
                service: name.clone(),
                binding: *binding,
            });
        }
        // The owner the config gave goes with it, where the service outlives its bindings (one
        // given since by hand stays).
        let remains = !bound.is_subset(&was.bindings) || has_generations(name);
        if !was.owner.is_none() && *owner == was.owner && remains {
            plan.push(Change::Owned {
                service: name.clone(),
                owner: Owner::default(),
            });
        }
    }
    for (name, wanted) in &desired.services {
        let (_, bound) = current.get(name).unwrap_or(&empty);
        for binding in bound.difference(&wanted.bindings) {
            plan.push(Change::Unbound {
                service: name.clone(),
                binding: *binding,
            });
        }
    }
    let mut unchanged = Vec::new();
    for (name, wanted) in &desired.services {
        let (owner, bound) = current.get(name).unwrap_or(&empty);
        let before = plan.len();
        for binding in wanted.bindings.difference(bound) {
            plan.push(Change::Bound {
                service: name.clone(),
                binding: *binding,
            });
        }
        // A service with no binding does not exist to be owned.
        if *owner != wanted.owner && !wanted.bindings.is_empty() {
            plan.push(Change::Owned {
                service: name.clone(),
                owner: wanted.owner,
            });
        }
        if plan.len() == before && !plan.iter().any(|c| c.service() == name) {
            unchanged.push(name.clone());
        }
    }
    let mut done: Vec<(Change, Option<Owner>)> = Vec::new();
    for change in plan {
        let previous_owner = registry.owner(change.service());
        if let Err(source) = make(registry, &change) {
            for (made, owner) in done.into_iter().rev() {
                if let Err(err) = undo(registry, &made, owner) {
                    tracing::warn!(
                        "undoing \"{made}\" after a failed config change: {}",
                        crate::error_chain(&err)
                    );
                }
            }
            return Err(ApplyError {
                change: Box::new(change),
                source,
            });
        }
        done.push((change, previous_owner));
    }
    Ok(Applied {
        changes: done.into_iter().map(|(c, _)| c).collect(),
        unchanged,
    })
}

impl Change {
    fn service(&self) -> &ServiceName {
        match self {
            Self::Bound { service, .. }
            | Self::Unbound { service, .. }
            | Self::Owned { service, .. } => service,
        }
    }
}

fn make(registry: &mut Registry, change: &Change) -> Result<(), RegistryError> {
    match change {
        Change::Bound { service, binding } => registry.bind(service, *binding, None),
        Change::Unbound { service, binding } => registry.unbind(service, *binding),
        Change::Owned { service, owner } => registry.set_owner(service, *owner),
    }
}

/// Undoes `change`; `owner` is the service's owner before it (`None`: it did not exist).
fn undo(
    registry: &mut Registry,
    change: &Change,
    owner: Option<Owner>,
) -> Result<(), RegistryError> {
    match change {
        Change::Bound { service, binding } => registry.unbind(service, *binding),
        Change::Unbound { service, binding } => registry.bind(service, *binding, owner),
        Change::Owned { service, .. } => registry.set_owner(service, owner.unwrap_or_default()),
    }
}

/// Where the daemon reads its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// Whether it must exist (`--config` named it); the default file may be missing, which
    /// reads as an empty config.
    pub required: bool,
}

/// Reloading the config failed; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A change to the registry failed (and what was made before it was undone).
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl ReloadError {
    /// Its code on the wire.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            Self::Config(_) => crate::protocol::ErrorCode::InvalidRequest,
            Self::Apply(err) => err.source.code(),
        }
    }
}

/// The daemon's config: where it is read from, and what of it was applied last. One reload
/// at a time: the caller holds the registry for the whole of one.
#[derive(Debug)]
pub struct Reloader {
    file: ConfigFile,
    applied_path: PathBuf,
    applied: Config,
}

impl Reloader {
    /// A reloader for `file`, remembering what it applied at `applied_path`.
    pub fn new(file: ConfigFile, applied_path: PathBuf) -> Self {
        let applied = load_applied(&applied_path);
        Self {
            file,
            applied_path,
            applied,
        }
    }

    /// The file it reads.
    pub fn file(&self) -> &ConfigFile {
        &self.file
    }

    /// Reads the file now (a missing default file is an empty config).
    pub fn read(&self) -> Result<Config, ConfigError> {
        match Config::load(&self.file.path) {
            Err(ConfigError::Read(err))
                if !self.file.required && err.source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Config::default())
            }
            result => result,
        }
    }

    /// Reads the file and applies it to `registry`: whole, or (with the reason) not at all.
    pub fn reload(&mut self, registry: &mut Registry) -> Result<Applied, ReloadError> {
        let desired = self.read()?;
        self.apply(registry, desired)
    }

    /// Applies `desired` (a config [`Reloader::read`] read) to `registry`: whole, or not at
    /// all.
    pub fn apply(
        &mut self,
        registry: &mut Registry,
        desired: Config,
    ) -> Result<Applied, ReloadError> {
        let applied = apply(registry, &desired, &self.applied)?;
        if let Err(err) = store_applied(&self.applied_path, &desired) {
            // The registry has it; only a restarted daemon's memory of dropped services is
            // older.
            tracing::warn!(
                "writing down the config applied: {}",
                crate::error_chain(&err)
            );
        }
        self.applied = desired;
        Ok(applied)
    }
}

/// Where the daemon keeps the config it applied last, beside its control socket: a restarted
/// daemon then still removes what a service dropped from the file while it was down.
pub fn applied_path(socket: &Path) -> PathBuf {
    crate::with_suffix(socket, ".config-applied.json")
}

/// The config applied last, or an empty one (none yet, or a file this version cannot read:
/// then only what the file names now is managed).
pub fn load_applied(path: &Path) -> Config {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            tracing::warn!(
                "{} is unreadable ({err}); services dropped from the config before now keep their bindings",
                path.display()
            );
            Config::default()
        }),
        Err(_) => Config::default(),
    }
}

/// Writes down the config applied.
pub fn store_applied(path: &Path, config: &Config) -> Result<(), PathError> {
    let json = serde_json::to_vec_pretty(config).expect("plain data serialises");
    crate::files::replace_private(path, &json, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("hotswap.toml"))
    }

    fn place(err: ConfigError) -> (usize, usize, String) {
        match err {
            ConfigError::At {
                line,
                column,
                problem,
                ..
            } => (line, column, problem.to_string()),
            other => panic!("not a placed error: {other}"),
        }
    }

    #[test]
    fn two_services_with_owners_and_bindings_parse() {
        let config = parse(
            r#"
[[service]]
name = "web"
owner = "0"
bind = ["tcp 0.0.0.0/0 80", "tcp ::/0 80"]

[[service]]
name = "dns"
group = "0"
bind = ["udp 127.0.0.1/32 53"]
"#,
        )
        .unwrap();
        assert_eq!(config.services.len(), 2);
        let web = &config.services[&"web".parse().unwrap()];
        assert_eq!(web.owner.uid, Some(0));
        assert_eq!(web.bindings.len(), 2);
        let dns = &config.services[&"dns".parse().unwrap()];
        assert_eq!(dns.owner.gid, Some(0));
        assert!(dns
            .bindings
            .contains(&"udp 127.0.0.1/32 53".parse().unwrap()));
    }

    #[test]
    fn an_empty_file_is_an_empty_config() {
        assert_eq!(parse("# nothing\n").unwrap(), Config::default());
    }

    #[test]
    fn errors_say_line_and_column() {
        let (line, column, problem) = place(
            parse("[[service]]\nname = \"web\"\nbind = [\"tcp 0.0.0.0/0 80\", \"tcp 10.0.0.1/8 80\"]\n")
                .unwrap_err(),
        );
        assert_eq!((line, column), (3, 29));
        assert!(problem.contains("host bits"), "{problem}");

        let (line, column, problem) =
            place(parse("[[service]]\nname = \"web\"\nbnid = []\n").unwrap_err());
        assert_eq!((line, column), (3, 1));
        assert!(problem.contains("bnid"), "{problem}");

        let (line, _, problem) = place(parse("[[service]]\nname = \"Web!\"\n").unwrap_err());
        assert_eq!(line, 2);
        assert!(problem.contains("invalid service name"), "{problem}");

        let (line, _, _) = place(parse("[[service]\nname = 1\n").unwrap_err());
        assert_eq!(line, 1);
    }

    #[test]
    fn a_binding_claimed_twice_or_a_service_named_twice_is_refused() {
        let (line, _, problem) = place(
            parse("[[service]]\nname = \"a\"\nbind = [\"tcp 127.0.0.1/32 80\"]\n[[service]]\nname = \"b\"\nbind = [\"tcp 127.0.0.1/32 80\"]\n")
                .unwrap_err(),
        );
        assert_eq!(line, 6);
        assert!(problem.contains("bound to service a"), "{problem}");
        let (line, _, problem) =
            place(parse("[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n").unwrap_err());
        assert_eq!(line, 4);
        assert!(problem.contains("named twice"), "{problem}");
    }

    #[test]
    fn an_unknown_user_is_refused_where_it_is_named() {
        let text =
            "[[service]]\nname = \"a\"\nowner = \"no-such-user-here\"\nbind = [\"tcp ::/0 80\"]\n";
        let (line, column, problem) = place(parse(text).unwrap_err());
        assert_eq!((line, column), (3, 9));
        assert!(problem.contains("no user"), "{problem}");
    }

    #[test]
    fn an_owner_without_a_binding_is_refused_where_it_is_given() {
        let (line, column, problem) =
            place(parse("[[service]]\nname = \"a\"\ngroup = \"root\"\n").unwrap_err());
        assert_eq!((line, column), (3, 9));
        assert!(problem.contains("no binding"), "{problem}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(line_and_column("é = 1\nab", 8), (2, 2));
    }
}
