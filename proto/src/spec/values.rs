//! Run-spec values with a fixed set of meanings that TOML spells as plain
//! strings (`reference.path = "same"`, `data.negatives = "random"`, a path):
//! enums inside, the same strings on the wire and in the store.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Dtype;

impl Dtype {
    /// The spelling in run specs (and in the reference cache's namespace).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// A dtype name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?} (expected f32, bf16 or f16)")]
pub struct UnknownDtype(pub String);

impl std::str::FromStr for Dtype {
    type Err = UnknownDtype;

    /// Run-spec spellings, and PyTorch's long names.
    fn from_str(s: &str) -> Result<Self, UnknownDtype> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            other => Err(UnknownDtype(other.to_string())),
        }
    }
}

/// Serializes an enum kept in TOML as a plain string (`"same"`, a path, ...).
macro_rules! string_enum_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.spelling())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(<$ty>::from_spelling(&String::deserialize(d)?))
            }
        }
    };
}

/// `reference.path`: the model that scores log π_ref.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReferenceModel {
    /// `"same"`: a frozen copy of the initial policy.
    #[default]
    Same,
    /// `"none"`: reference-free (log π_ref = 0).
    None,
    /// Another model directory (relative to the spec file).
    Dir(PathBuf),
}

impl ReferenceModel {
    fn from_spelling(s: &str) -> Self {
        match s {
            "same" => ReferenceModel::Same,
            "none" => ReferenceModel::None,
            dir => ReferenceModel::Dir(PathBuf::from(dir)),
        }
    }

    fn spelling(&self) -> String {
        match self {
            ReferenceModel::Same => "same".into(),
            ReferenceModel::None => "none".into(),
            ReferenceModel::Dir(d) => d.to_string_lossy().into_owned(),
        }
    }

    /// The separate reference directory, when there is one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ReferenceModel::Dir(d) => Some(d),
            _ => None,
        }
    }

    /// The weights that score the reference: the separate directory, else the
    /// policy's initial weights (`policy`).
    pub fn weights<'a>(&'a self, policy: &'a Path) -> &'a Path {
        self.dir().unwrap_or(policy)
    }
}

string_enum_serde!(ReferenceModel);

/// `reference.cache`: where precomputed reference log-probabilities are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReferenceCache {
    /// `""`: the user cache (`$DPO_CACHE_DIR/reference`, else
    /// `$XDG_CACHE_HOME/dpo-cluster/reference`, else `~/.cache/dpo-cluster/reference`).
    #[default]
    User,
    /// `"none"`: recompute every run.
    Off,
    /// A directory (relative to the spec file).
    Dir(PathBuf),
}

impl ReferenceCache {
    fn from_spelling(s: &str) -> Self {
        match s {
            "" => ReferenceCache::User,
            "none" => ReferenceCache::Off,
            dir => ReferenceCache::Dir(PathBuf::from(dir)),
        }
    }

    fn spelling(&self) -> String {
        match self {
            ReferenceCache::User => String::new(),
            ReferenceCache::Off => "none".into(),
            ReferenceCache::Dir(d) => d.to_string_lossy().into_owned(),
        }
    }
}

string_enum_serde!(ReferenceCache);

/// `data.negatives`: where negative examples come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negatives {
    /// `"random"`: another label of the task, or another example's response.
    Random,
    /// `"policy"`: samples of the reference model that differ from the label.
    Policy,
    /// `"adversarial"` (encoder tasks): at each labelled position, the label the
    /// current model finds most likely among the wrong ones, mined again at the
    /// start of every epoch.
    Adversarial,
    /// `"confusion"` (NER): rule-based near misses of each entity tag — `B-X`↔`I-X`,
    /// and the same span with another entity type.
    Confusion,
    /// A file of negatives (relative to the spec file).
    File(PathBuf),
}

impl Negatives {
    fn from_spelling(s: &str) -> Self {
        match s {
            "random" => Negatives::Random,
            "policy" => Negatives::Policy,
            "adversarial" => Negatives::Adversarial,
            "confusion" => Negatives::Confusion,
            file => Negatives::File(PathBuf::from(file)),
        }
    }

    fn spelling(&self) -> String {
        match self {
            Negatives::Random => "random".into(),
            Negatives::Policy => "policy".into(),
            Negatives::Adversarial => "adversarial".into(),
            Negatives::Confusion => "confusion".into(),
            Negatives::File(f) => f.to_string_lossy().into_owned(),
        }
    }

    /// The file, when negatives are read from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Negatives::File(f) => Some(f),
            _ => None,
        }
    }
}

string_enum_serde!(Negatives);
