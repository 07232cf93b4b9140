//! Registry state (global schema ids, per-subject version lists) and its JSON-file persistence.
//!
//! All rules live here as plain synchronous methods on [`State`]; [`Store`] adds the lock and the
//! "persist before publishing" step so the HTTP layer never touches files or locks directly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use super::{RegistryError, Storage};

/// A schema text that parsed as Avro, plus the key that decides schema identity.
pub(super) struct Parsed {
    /// Needed for compatibility checks against earlier versions.
    schema: Schema,
    /// Identity key: the parsed schema serialized back to JSON. Whitespace, attribute order and
    /// name qualification are normalised away, but `default`, `doc` and `logicalType` are kept:
    /// Avro's Parsing Canonical Form strips those and would collapse e.g. `long` and
    /// `timestamp-micros` onto one id, which decode to different values.
    key: String,
}

impl Parsed {
    pub(super) fn new(text: &str) -> Result<Self, RegistryError> {
        let schema =
            Schema::parse_str(text).map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        let key = serde_json::to_string(&schema)
            .map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        Ok(Self { schema, key })
    }
}

/// Which version of a subject a request addresses.
#[derive(Debug, Clone, Copy)]
pub(super) enum VersionSel {
    Latest,
    Number(u32),
}

impl VersionSel {
    /// Confluent accepts `latest`, `-1` (also latest) or a version in `1..=i32::MAX`.
    pub(super) fn parse(raw: &str) -> Result<Self, RegistryError> {
        match raw {
            "latest" | "-1" => Ok(Self::Latest),
            _ => match raw.parse::<u32>() {
                Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(Self::Number(n)),
                _ => Err(RegistryError::InvalidVersion(raw.to_owned())),
            },
        }
    }
}

/// One subject version as returned by the `GET .../versions/{v}` family.
pub(super) struct VersionInfo<'a> {
    pub(super) version: u32,
    pub(super) id: u32,
    pub(super) schema: &'a str,
}

/// Result of a registration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Registered {
    pub(super) id: u32,
    pub(super) version: u32,
    /// False when the subject already had this schema and nothing changed.
    pub(super) created: bool,
}

/// The whole registry; this exact shape is the persisted JSON file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct State {
    /// Schema text as first registered, by global id. Ids are never reused or renumbered, so ids
    /// embedded in already-written Kafka records stay resolvable (also across restarts).
    schemas: BTreeMap<u32, String>,
    /// Subject -> schema ids in version order: version `n` is element `n - 1`. Deletion is not
    /// supported, so versions are dense and start at 1 as in Confluent.
    subjects: BTreeMap<String, Vec<u32>>,
    /// Identity key (see [`Parsed::key`]) -> id, so equal schemas share one global id across
    /// subjects. Derived data: rebuilt on load, never persisted.
    #[serde(skip)]
    ids_by_key: HashMap<String, u32>,
}

fn version_number(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

impl State {
    /// Parses a persisted file and rebuilds the derived index, rejecting inconsistent files.
    fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut state: State = serde_json::from_slice(bytes)?;
        for (id, text) in &state.schemas {
            let parsed = Parsed::new(text)
                .with_context(|| format!("stored schema {id} no longer parses"))?;
            state.ids_by_key.insert(parsed.key, *id);
        }
        for (subject, ids) in &state.subjects {
            if let Some(id) = ids.iter().find(|id| !state.schemas.contains_key(id)) {
                anyhow::bail!("subject {subject:?} refers to unknown schema id {id}");
            }
        }
        Ok(state)
    }

    pub(super) fn schema(&self, id: u32) -> Result<&str, RegistryError> {
        self.schemas
            .get(&id)
            .map(String::as_str)
            .ok_or(RegistryError::SchemaNotFound)
    }

    pub(super) fn subjects(&self) -> impl Iterator<Item = &str> {
        self.subjects.keys().map(String::as_str)
    }

    /// `(subject, version)` pairs that use schema `id`.
    pub(super) fn usages(&self, id: u32) -> Result<Vec<(&str, u32)>, RegistryError> {
        self.schema(id)?;
        let mut out = Vec::new();
        for (subject, ids) in &self.subjects {
            for (i, _) in ids.iter().enumerate().filter(|(_, v)| **v == id) {
                out.push((subject.as_str(), version_number(i)));
            }
        }
        Ok(out)
    }

    fn ids(&self, subject: &str) -> Result<&[u32], RegistryError> {
        match self.subjects.get(subject) {
            Some(ids) if !ids.is_empty() => Ok(ids),
            _ => Err(RegistryError::SubjectNotFound(subject.to_owned())),
        }
    }

    pub(super) fn versions(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        Ok((0..self.ids(subject)?.len()).map(version_number).collect())
    }

    pub(super) fn version(
        &self,
        subject: &str,
        sel: VersionSel,
    ) -> Result<VersionInfo<'_>, RegistryError> {
        let ids = self.ids(subject)?;
        let index = match sel {
            VersionSel::Latest => ids.len() - 1,
            VersionSel::Number(n) => n as usize - 1,
        };
        let id = *ids.get(index).ok_or(RegistryError::VersionNotFound)?;
        Ok(VersionInfo {
            version: version_number(index),
            id,
            schema: self.schema(id)?,
        })
    }

    /// The version of `subject` whose schema is identical to `parsed`.
    pub(super) fn lookup(
        &self,
        subject: &str,
        parsed: &Parsed,
    ) -> Result<VersionInfo<'_>, RegistryError> {
        let ids = self.ids(subject)?;
        let id = self
            .ids_by_key
            .get(&parsed.key)
            .ok_or(RegistryError::SchemaNotFound)?;
        let index = ids
            .iter()
            .position(|v| v == id)
            .ok_or(RegistryError::SchemaNotFound)?;
        Ok(VersionInfo {
            version: version_number(index),
            id: *id,
            schema: self.schema(*id)?,
        })
    }

    /// BACKWARD: `parsed` as reader must fully resolve data written with the selected version.
    /// `Compatibility::Partial` (e.g. a dropped enum symbol) counts as incompatible, as in Confluent.
    pub(super) fn check_backward(
        &self,
        subject: &str,
        sel: VersionSel,
        parsed: &Parsed,
    ) -> Result<(), RegistryError> {
        let writer_text = self.version(subject, sel)?.schema;
        let writer = Schema::parse_str(writer_text)
            .map_err(|e| RegistryError::Internal(format!("stored schema unparsable: {e}")))?;
        match SchemaCompatibility::can_read(&writer, &parsed.schema) {
            Ok(Compatibility::Full) => Ok(()),
            Ok(Compatibility::Partial) => Err(RegistryError::Incompatible(
                "the new schema can read only some data written with the existing schema (enum symbols or union branches removed)".into(),
            )),
            Err(e) => Err(RegistryError::Incompatible(e.to_string())),
        }
    }

    /// Adds `parsed` as the next version of `subject`. The caller has already checked (with
    /// [`State::lookup`]) that the subject does not have this schema yet.
    fn register(
        &mut self,
        subject: &str,
        text: &str,
        parsed: &Parsed,
    ) -> Result<Registered, RegistryError> {
        if self.ids(subject).is_ok() {
            self.check_backward(subject, VersionSel::Latest, parsed)?;
        }
        let id = match self.ids_by_key.get(&parsed.key) {
            Some(id) => *id,
            None => {
                let id = self.schemas.keys().next_back().map_or(1, |max| max + 1);
                self.schemas.insert(id, text.to_owned());
                self.ids_by_key.insert(parsed.key.clone(), id);
                id
            }
        };
        let ids = self.subjects.entry(subject.to_owned()).or_default();
        ids.push(id);
        Ok(Registered {
            id,
            version: version_number(ids.len() - 1),
            created: true,
        })
    }
}

/// Shared registry state plus where (if anywhere) it is persisted.
pub(super) struct Store {
    /// Readers (lookups, decoders) run concurrently; registrations take the write lock for the
    /// whole check-persist-publish step so ids are assigned and written in order.
    state: RwLock<State>,
    /// `None` for [`Storage::Memory`].
    file: Option<PathBuf>,
}

impl Store {
    /// Loads the persisted state (if any); a missing file means an empty registry.
    pub(super) async fn open(storage: &Storage) -> anyhow::Result<Self> {
        let Storage::File(path) = storage else {
            return Ok(Self {
                state: RwLock::new(State::default()),
                file: None,
            });
        };
        let state = match tokio::fs::read(path).await {
            Ok(bytes) => State::from_json(&bytes)
                .with_context(|| format!("invalid registry file {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading registry file {}", path.display()));
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self {
            state: RwLock::new(state),
            file: Some(path.clone()),
        })
    }

    pub(super) async fn read(&self) -> tokio::sync::RwLockReadGuard<'_, State> {
        self.state.read().await
    }

    /// Registers on a copy, persists the copy, and only then publishes it, so a failed write
    /// never leaves clients holding an id that a restart would forget.
    pub(super) async fn register(
        &self,
        subject: &str,
        text: &str,
        parsed: &Parsed,
    ) -> Result<Registered, RegistryError> {
        let mut guard = self.state.write().await;
        if let Ok(found) = guard.lookup(subject, parsed) {
            return Ok(Registered {
                id: found.id,
                version: found.version,
                created: false,
            });
        }
        let mut next = guard.clone();
        let registered = next.register(subject, text, parsed)?;
        if let Some(path) = &self.file {
            persist(path, &next)
                .await
                .map_err(|e| RegistryError::Internal(format!("{e:#}")))?;
        }
        *guard = next;
        Ok(registered)
    }
}

/// Atomic replace: write `<path>.tmp`, fsync, rename over `path`.
async fn persist(path: &Path, state: &State) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(state)?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming onto {}", path.display()))?;
        Ok(())
    })
    .await?
}
