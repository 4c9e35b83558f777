//! `krvirt.io/v1` Image: a disk image in a host's content-addressed image
//! store (cluster-scoped; the object's name is the image name). The image
//! service keeps it current: one entry per tag with the sha256 digest it
//! points at, the layer it is based on, the tag history, and a `Verified`
//! condition that turns False (reason `DigestMismatch`) when a stored blob
//! no longer matches its digest — no VM starts on it then.
//!
//! Images are managed with `krvirt image import|upload|tag|rm|gc` (the
//! image service endpoints); the object mirrors the store.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, idx, join};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};

pub const API_VERSION: &str = "krvirt.io/v1";
/// Condition type: every blob of every tag matched its digest when last checked.
pub const CONDITION_VERIFIED: &str = "Verified";
/// Condition reason when a blob no longer matches.
pub const REASON_DIGEST_MISMATCH: &str = "DigestMismatch";

/// Image names: `[a-z0-9][a-z0-9._-]*`, at most 128 characters.
const MAX_IMAGE_NAME: usize = 128;

/// A disk image and its version tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// `krvirt.io/v1`
    #[serde(default)]
    pub api_version: String,
    /// `Image`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ImageSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ImageStatus>,
}

impl Default for Image {
    fn default() -> Self {
        Image {
            api_version: API_VERSION.to_string(),
            kind: "Image".to_string(),
            metadata: ObjectMeta::default(),
            spec: ImageSpec::default(),
            status: None,
        }
    }
}

/// Intent for an image (informational: content changes go through the image service).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Human description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One tag of an image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageTag {
    pub tag: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// Bytes of the blob.
    #[serde(default)]
    pub size: u64,
    /// `raw` or `qcow2`.
    #[serde(default)]
    pub format: String,
    /// Digest of the image this one is a qcow2 layer on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where the blob came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One change of a tag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageTagEvent {
    pub time: String,
    pub tag: String,
    /// New digest (absent: the tag was removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// What the image store holds for this image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStatus {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tags: Vec<ImageTag>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<ImageTagEvent>,
    /// Host whose store holds the blobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Admit for Image {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_IMAGE_NAME, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        let Some(st) = &self.status else { return };
        for (i, t) in st.tags.iter().enumerate() {
            let p = idx("status.tags", i);
            if t.tag.is_empty() {
                c.invalid(join(&p, "tag"), "must not be empty".to_string());
            }
            if !valid_digest(&t.digest) {
                c.invalid(
                    join(&p, "digest"),
                    format!("{:?} is not sha256:<64 hex digits>", t.digest),
                );
            }
            if let Some(pd) = &t.parent
                && !valid_digest(pd)
            {
                c.invalid(
                    join(&p, "parent"),
                    format!("{pd:?} is not sha256:<64 hex digits>"),
                );
            }
        }
    }
}
