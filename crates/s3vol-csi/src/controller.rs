//! The Controller service: CreateVolume, DeleteVolume, ValidateVolumeCapabilities,
//! ControllerExpandVolume.
//!
//! A volume is either a new bucket (`mode: bucket`) or a new prefix of an existing bucket
//! (`mode: prefix`). At its root CreateVolume writes a marker object, [`MARKER`], recording the
//! CSI volume name, the volume id, the capacity asked for and the StorageClass parameters. The
//! marker is what makes the two calls safe:
//!
//! - CreateVolume repeated with the same name finds the marker: same parameters and a capacity
//!   range the recorded capacity satisfies (or no range) → the existing volume, with its
//!   recorded capacity (CSI v1.9: "compatible with the specified capacity_range"); other
//!   parameters, or a range the recorded capacity falls outside of → `ALREADY_EXISTS`. A
//!   bucket or prefix that exists *without* a marker and holds data is never claimed
//!   (`ALREADY_EXISTS`); an empty one is (it is what a CreateVolume interrupted before writing
//!   its marker leaves behind).
//! - ValidateVolumeCapabilities and ControllerExpandVolume of a volume id s3vol hands out read
//!   the marker: none, or one naming another id, is `NOT_FOUND` (never created, or deleted).
//!   A static volume (any other id) is found when its bucket exists.
//! - ControllerExpandVolume records the new size in the marker and needs nothing on the node
//!   (`node_expansion_required: false`), so a resize completes online.
//! - DeleteVolume deletes only when the marker is there and names this very volume id, so a
//!   static volume's bucket, another driver's bucket or a forged id is never emptied. Objects
//!   go first (listed and deleted 1000 at a time), the marker last, then (bucket mode) the
//!   bucket; a failure part-way leaves the marker, so the CO's retry finishes the job.
//!
//! Capacity is recorded, not enforced: S3 has no quota per bucket or prefix that s3vol could
//! set portably. Every call on one volume name (or id) is serialised.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use s3vol_s3::{
    AwsStore, BucketName, ListRequest, ObjectStore, PutOptions, S3Error, StaticCredentials,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::locks::KeyLocks;
use crate::params::{self, Defaults, ProvisionMode, ProvisionParams, VolumeAttrs};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::validate_volume_capabilities_response::Confirmed;
use crate::proto::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerServiceCapability, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest,
    DeleteVolumeResponse, ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse,
    Volume, VolumeCapability,
};
use crate::secret::VolumeSecret;
use crate::volume_id::{Location, VolumeId, VolumeKind, derive_bucket_name, derive_prefix};

/// The key of the marker object, relative to the volume's root.
pub const MARKER: &str = ".s3vol-volume.json";

/// What the marker records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    /// The driver that created the volume.
    pub driver: String,
    pub volume_name: String,
    pub volume_id: String,
    pub capacity_bytes: i64,
    pub parameters: BTreeMap<String, String>,
}

/// Makes store clients; tests substitute an in-memory store.
#[tonic::async_trait]
pub trait StoreFactory: Send + Sync + std::fmt::Debug + 'static {
    async fn store(
        &self,
        location: &Location,
        credentials: Option<StaticCredentials>,
    ) -> Arc<dyn ObjectStore>;
}

/// Clients for real S3 endpoints.
#[derive(Debug, Default)]
pub struct AwsStores;

#[tonic::async_trait]
impl StoreFactory for AwsStores {
    async fn store(
        &self,
        location: &Location,
        credentials: Option<StaticCredentials>,
    ) -> Arc<dyn ObjectStore> {
        Arc::new(AwsStore::new(&params::s3_config(location, credentials)).await)
    }
}

/// The Controller service.
#[derive(Debug)]
pub struct ControllerService {
    driver_name: String,
    defaults: Defaults,
    stores: Arc<dyn StoreFactory>,
    locks: KeyLocks,
}

impl ControllerService {
    pub fn new(driver_name: String, defaults: Defaults, stores: Arc<dyn StoreFactory>) -> Self {
        Self {
            driver_name,
            defaults,
            stores,
            locks: KeyLocks::default(),
        }
    }

    async fn create(&self, req: CreateVolumeRequest) -> CsiResult<Volume> {
        if req.name.is_empty() {
            return Err(CsiError::invalid("name is required"));
        }
        no_nul_in(&req.name, "name")?;
        check_capabilities(&req.volume_capabilities)?;
        if req.volume_content_source.is_some() {
            return Err(CsiError::invalid(
                "volume_content_source is not supported (no snapshots or clones)",
            ));
        }
        let range = req.capacity_range.unwrap_or_default();
        let capacity = capacity(&range)?;
        let secret = VolumeSecret::parse(&req.secrets)?;
        let params = ProvisionParams::parse(&req.parameters, &secret.hints, &self.defaults)?;
        let creds = secret.credentials;
        let kind = match &params.mode {
            ProvisionMode::Bucket { bucket_prefix } => {
                VolumeKind::Bucket(derive_bucket_name(bucket_prefix.as_deref(), &req.name)?)
            }
            ProvisionMode::Prefix { bucket } => VolumeKind::Prefix {
                bucket: bucket.clone(),
                prefix: derive_prefix(&req.name),
            },
        };
        let id = VolumeId {
            kind,
            location: params.location.clone(),
        };
        let marker = Marker {
            driver: self.driver_name.clone(),
            volume_name: req.name.clone(),
            volume_id: id.to_string(),
            capacity_bytes: capacity,
            parameters: params.canonical(),
        };
        let _guard = self.locks.lock(&format!("name:{}", req.name)).await;
        let store = self.stores.store(&id.location, creds).await;
        let bucket = id.kind.bucket();
        let root = id.kind.root();
        let marker_key = format!("{root}{MARKER}");

        match read_marker(&*store, bucket, &marker_key).await {
            Ok(Some(found)) => {
                return if same_volume(&found, &marker) && fits(found.capacity_bytes, &range) {
                    tracing::info!(volume = %marker.volume_id, name = ?req.name, "volume exists already");
                    Ok(volume(&id, found.capacity_bytes))
                } else {
                    Err(incompatible(&found, &marker, &range))
                };
            }
            Ok(None) => {}
            Err(S3Error::NoSuchBucket(_)) if matches!(id.kind, VolumeKind::Bucket(_)) => {}
            Err(S3Error::NoSuchBucket(_)) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "bucket {bucket} (parameter bucket) does not exist; mode: prefix needs an existing bucket"
                )));
            }
            Err(e) => return Err(CsiError::s3(format!("reading {bucket}/{marker_key}"))(e)),
        }

        if let VolumeKind::Bucket(_) = id.kind {
            match store.head_bucket(bucket).await {
                Ok(()) => {}
                Err(S3Error::NoSuchBucket(_) | S3Error::NotFound(_)) => {
                    store.create_bucket(bucket).await.map_err(|e| match e {
                        S3Error::BucketAlreadyExists(_) => CsiError::AlreadyExists(format!(
                            "bucket {bucket} for volume {} is owned by someone else",
                            req.name
                        )),
                        e => CsiError::s3(format!("creating bucket {bucket}"))(e),
                    })?;
                    tracing::info!(%bucket, name = ?req.name, "created bucket");
                }
                Err(e) => return Err(CsiError::s3(format!("checking bucket {bucket}"))(e)),
            }
        }
        // Never claim data that is not ours: only an empty bucket or prefix becomes a volume.
        let page = store
            .list_objects(
                bucket,
                &ListRequest {
                    prefix: root.to_owned(),
                    max_keys: Some(1),
                    ..ListRequest::default()
                },
            )
            .await
            .map_err(CsiError::s3(format!("listing {bucket}/{root}")))?;
        if !page.objects.is_empty() {
            return Err(CsiError::AlreadyExists(format!(
                "{bucket}/{root} already holds objects but is not an s3vol volume; \
                 refusing to take it over for volume {}",
                req.name
            )));
        }
        let body = Bytes::from(
            serde_json::to_vec_pretty(&marker)
                .map_err(|e| CsiError::Internal(format!("encoding the volume marker: {e}")))?,
        );
        let put = PutOptions {
            content_type: Some("application/json".into()),
            if_none_match_any: true,
            ..PutOptions::default()
        };
        match store.put_object(bucket, &marker_key, body, &put).await {
            Ok(_) => {}
            Err(S3Error::PreconditionFailed(_)) => {
                // Someone wrote a marker since we looked: it decides.
                let found = read_marker(&*store, bucket, &marker_key)
                    .await
                    .map_err(CsiError::s3(format!("reading {bucket}/{marker_key}")))?;
                match found {
                    Some(found)
                        if same_volume(&found, &marker) && fits(found.capacity_bytes, &range) =>
                    {
                        return Ok(volume(&id, found.capacity_bytes));
                    }
                    Some(found) => return Err(incompatible(&found, &marker, &range)),
                    None => {
                        return Err(CsiError::Unavailable(format!(
                            "the marker of {bucket}/{root} changed under us; retry"
                        )));
                    }
                }
            }
            Err(e) => return Err(CsiError::s3(format!("writing {bucket}/{marker_key}"))(e)),
        }
        tracing::info!(volume = %marker.volume_id, name = ?req.name, capacity, "created volume");
        Ok(volume(&id, capacity))
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> CsiResult<()> {
        if req.volume_id.is_empty() {
            return Err(CsiError::invalid("volume_id is required"));
        }
        no_nul_in(&req.volume_id, "volume_id")?;
        let id: VolumeId = match req.volume_id.parse() {
            Ok(id) => id,
            Err(_) => {
                // Not an id this driver hands out (e.g. a static volume): nothing of ours.
                tracing::info!(volume = ?req.volume_id, "DeleteVolume of a volume id s3vol never created: nothing to do");
                return Ok(());
            }
        };
        // The volume id says where the volume is; only the Secret's credentials matter here.
        let creds = VolumeSecret::parse(&req.secrets)?.credentials;
        let _guard = self.locks.lock(&format!("id:{}", req.volume_id)).await;
        let store = self.stores.store(&id.location, creds).await;
        let bucket = id.kind.bucket();
        let root = id.kind.root();
        let marker_key = format!("{root}{MARKER}");
        let marker = match read_marker(&*store, bucket, &marker_key).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(S3Error::NoSuchBucket(_)) => {
                tracing::info!(volume = ?req.volume_id, "no volume marker: already deleted, or not ours");
                return Ok(());
            }
            Err(e) => return Err(CsiError::s3(format!("reading {bucket}/{marker_key}"))(e)),
        };
        if marker.volume_id != req.volume_id {
            tracing::warn!(volume = ?req.volume_id, marker = %marker.volume_id, "the marker names another volume: deleting nothing");
            return Ok(());
        }
        let deleted = empty_root(&*store, bucket, root, &marker_key).await?;
        store
            .delete_object(bucket, &marker_key)
            .await
            .map_err(CsiError::s3(format!("deleting {bucket}/{marker_key}")))?;
        if let VolumeKind::Bucket(_) = id.kind {
            match store.delete_bucket(bucket).await {
                Ok(()) | Err(S3Error::NoSuchBucket(_)) => {}
                Err(e) => {
                    // Put the marker back so a retry still knows the bucket is ours.
                    let body = serde_json::to_vec_pretty(&marker).unwrap_or_default();
                    let _ = store
                        .put_object(bucket, &marker_key, body.into(), &PutOptions::default())
                        .await;
                    return Err(CsiError::s3(format!("deleting bucket {bucket}"))(e));
                }
            }
        }
        tracing::info!(volume = ?req.volume_id, objects = deleted, "deleted volume");
        Ok(())
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::invalid("volume_id is required"));
        }
        no_nul_in(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::invalid("volume_capabilities is required"));
        }
        let secret = VolumeSecret::parse(&req.secrets)?;
        match req.volume_id.parse::<VolumeId>() {
            Ok(id) => {
                let _guard = self.locks.lock(&format!("id:{}", req.volume_id)).await;
                self.find(&id, &req.volume_id, secret.credentials).await?;
            }
            Err(_) => {
                let attrs = VolumeAttrs::parse(&req.volume_context, &secret.hints, &self.defaults)
                    .map_err(|_| {
                        CsiError::NotFound(format!(
                            "volume {} is neither one s3vol created nor a static volume with a \
                             bucket attribute or a secret naming the bucket",
                            req.volume_id
                        ))
                    })?;
                let store = self.stores.store(&attrs.location, secret.credentials).await;
                match store.head_bucket(&attrs.bucket).await {
                    Ok(()) => {}
                    Err(S3Error::NoSuchBucket(_) | S3Error::NotFound(_)) => {
                        return Err(CsiError::NotFound(format!(
                            "the bucket {} of static volume {} does not exist",
                            attrs.bucket, req.volume_id
                        )));
                    }
                    Err(e) => {
                        return Err(CsiError::s3(format!("checking bucket {}", attrs.bucket))(e));
                    }
                }
            }
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = capability::check(cap) {
                return Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                });
            }
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    /// The marker of a volume s3vol created; `NOT_FOUND` when it was never created here or
    /// has been deleted.
    async fn find(
        &self,
        id: &VolumeId,
        raw_id: &str,
        credentials: Option<StaticCredentials>,
    ) -> CsiResult<(Arc<dyn ObjectStore>, Marker)> {
        let store = self.stores.store(&id.location, credentials).await;
        let bucket = id.kind.bucket();
        let marker_key = format!("{}{MARKER}", id.kind.root());
        match read_marker(&*store, bucket, &marker_key).await {
            Ok(Some(m)) if m.volume_id == raw_id => Ok((store, m)),
            Ok(_) | Err(S3Error::NoSuchBucket(_)) => Err(CsiError::NotFound(format!(
                "volume {raw_id} does not exist (no volume marker {bucket}/{marker_key} naming it)"
            ))),
            Err(e) => Err(CsiError::s3(format!("reading {bucket}/{marker_key}"))(e)),
        }
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> CsiResult<ControllerExpandVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::invalid("volume_id is required"));
        }
        no_nul_in(&req.volume_id, "volume_id")?;
        let Some(range) = req.capacity_range else {
            return Err(CsiError::invalid("capacity_range is required"));
        };
        let wanted = capacity(&range)?;
        if let Some(cap) = &req.volume_capability {
            capability::check(cap).map_err(CsiError::InvalidArgument)?;
        }
        let id: VolumeId = req.volume_id.parse().map_err(|_| {
            CsiError::NotFound(format!(
                "volume {} is not one s3vol created; a static volume has no size to expand",
                req.volume_id
            ))
        })?;
        let creds = VolumeSecret::parse(&req.secrets)?.credentials;
        let _guard = self.locks.lock(&format!("id:{}", req.volume_id)).await;
        let (store, mut marker) = self.find(&id, &req.volume_id, creds).await?;
        if fits(marker.capacity_bytes, &range) && marker.capacity_bytes >= wanted {
            // Already that large (a repeated call, or a shrink asked for): nothing to record.
            return Ok(ControllerExpandVolumeResponse {
                capacity_bytes: marker.capacity_bytes,
                node_expansion_required: false,
            });
        }
        if range.limit_bytes > 0 && marker.capacity_bytes > range.limit_bytes {
            return Err(CsiError::OutOfRange(format!(
                "volume {} already records {} bytes, more than limit_bytes {}; volumes do not shrink",
                req.volume_id, marker.capacity_bytes, range.limit_bytes
            )));
        }
        let old = marker.capacity_bytes;
        marker.capacity_bytes = wanted;
        let bucket = id.kind.bucket();
        let marker_key = format!("{}{MARKER}", id.kind.root());
        let body = Bytes::from(
            serde_json::to_vec_pretty(&marker)
                .map_err(|e| CsiError::Internal(format!("encoding the volume marker: {e}")))?,
        );
        let put = PutOptions {
            content_type: Some("application/json".into()),
            ..PutOptions::default()
        };
        store
            .put_object(bucket, &marker_key, body, &put)
            .await
            .map_err(CsiError::s3(format!("writing {bucket}/{marker_key}")))?;
        tracing::info!(volume = ?req.volume_id, from = old, to = wanted, "expanded volume (recorded; S3 has no size to change)");
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: wanted,
            node_expansion_required: false,
        })
    }
}

/// `InvalidArgument` when a name or id holds a NUL byte (the maps are checked where they are
/// parsed).
fn no_nul_in(value: &str, field: &str) -> CsiResult<()> {
    if s3vol_s3::input::has_nul(value) {
        Err(CsiError::invalid(format!("{field} holds a NUL byte")))
    } else {
        Ok(())
    }
}

fn check_capabilities(caps: &[VolumeCapability]) -> CsiResult<()> {
    if caps.is_empty() {
        return Err(CsiError::invalid("volume_capabilities is required"));
    }
    for cap in caps {
        capability::check(cap).map_err(CsiError::InvalidArgument)?;
    }
    Ok(())
}

/// The capacity recorded for a range: the required size, else the limit, else 0 (unknown).
fn capacity(r: &CapacityRange) -> CsiResult<i64> {
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(CsiError::invalid("capacity_range must not be negative"));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(CsiError::OutOfRange(format!(
            "capacity_range: required_bytes {} exceeds limit_bytes {}",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(if r.required_bytes > 0 {
        r.required_bytes
    } else {
        r.limit_bytes
    })
}

fn volume(id: &VolumeId, capacity: i64) -> Volume {
    let attrs = VolumeAttrs {
        bucket: id.kind.bucket().clone(),
        prefix: id.kind.root().to_owned(),
        location: id.location.clone(),
    };
    let mut context = attrs.to_context();
    context.insert(params::keys::MODE.into(), id.kind.mode().into());
    Volume {
        capacity_bytes: capacity,
        volume_id: id.to_string(),
        volume_context: context,
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

/// Whether a marker found at a volume's place records the volume a request describes (all
/// but the capacity, which [`fits`] judges).
fn same_volume(found: &Marker, wanted: &Marker) -> bool {
    found.driver == wanted.driver
        && found.volume_name == wanted.volume_name
        && found.volume_id == wanted.volume_id
        && found.parameters == wanted.parameters
}

/// Whether a volume recording `capacity` bytes satisfies `range`. A volume recorded with no
/// size (0: none was asked for) holds any amount, so it satisfies every range; a negative
/// capacity (an unreadable marker) none.
fn fits(capacity: i64, range: &CapacityRange) -> bool {
    if capacity == 0 {
        return true;
    }
    capacity > 0
        && capacity >= range.required_bytes
        && (range.limit_bytes == 0 || capacity <= range.limit_bytes)
}

fn incompatible(found: &Marker, wanted: &Marker, range: &CapacityRange) -> CsiError {
    let what = if found.volume_name != wanted.volume_name {
        format!("it belongs to volume {:?}", found.volume_name)
    } else if same_volume(found, wanted) {
        format!(
            "it records {} bytes, outside the capacity range asked for (required {}, limit {})",
            found.capacity_bytes, range.required_bytes, range.limit_bytes
        )
    } else {
        "it was created with different parameters".to_owned()
    };
    CsiError::AlreadyExists(format!(
        "volume {} exists but is incompatible: {what}",
        wanted.volume_id
    ))
}

async fn read_marker(
    store: &dyn ObjectStore,
    bucket: &BucketName,
    key: &str,
) -> Result<Option<Marker>, S3Error> {
    use futures::TryStreamExt;
    let got = match store.get_object(bucket, key, None, None).await {
        Ok(g) => g,
        Err(S3Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let chunks: Vec<Bytes> = got.body.try_collect().await?;
    let body: Vec<u8> = chunks.concat();
    match serde_json::from_slice(&body) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            // Not a marker we can read: treat as foreign, never as ours.
            tracing::warn!(%bucket, key, error = %e, "unreadable volume marker");
            Ok(Some(Marker {
                driver: String::new(),
                volume_name: String::new(),
                volume_id: String::new(),
                capacity_bytes: -1,
                parameters: BTreeMap::new(),
            }))
        }
    }
}

/// Deletes every object under `root` except the marker, 1000 at a time; returns how many.
async fn empty_root(
    store: &dyn ObjectStore,
    bucket: &BucketName,
    root: &str,
    marker_key: &str,
) -> CsiResult<usize> {
    let mut deleted = 0;
    loop {
        // Always the first page: what was deleted is gone, so no continuation token is needed
        // (and none can go stale while we delete).
        let page = store
            .list_objects(
                bucket,
                &ListRequest {
                    prefix: root.to_owned(),
                    max_keys: Some(1000),
                    ..ListRequest::default()
                },
            )
            .await
            .map_err(CsiError::s3(format!("listing {bucket}/{root}")))?;
        let keys: Vec<String> = page
            .objects
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k != marker_key)
            .collect();
        if keys.is_empty() {
            if page.next_continuation_token.is_none() {
                return Ok(deleted);
            }
            // Only the marker on this page, yet more pages: impossible with max_keys 1000
            // unless the store pages oddly; give up rather than loop.
            return Err(CsiError::Internal(format!(
                "listing {bucket}/{root} returned only the marker but more pages"
            )));
        }
        let failed = store
            .delete_objects(bucket, &keys)
            .await
            .map_err(CsiError::s3(format!("deleting objects in {bucket}/{root}")))?;
        if let Some((key, e)) = failed.into_iter().next() {
            return Err(CsiError::s3(format!("deleting {bucket}/{key}"))(e));
        }
        deleted += keys.len();
    }
}

/// Names the StorageClass parameter that was missing when a call carried no Secret and the
/// driver has no identity of its own: the external sidecars pass a Secret only to the calls
/// whose `csi.storage.k8s.io/<call>-secret-name` parameter is set, and a StorageClass that sets
/// the provisioner's but not `controller-expand`'s makes every resize fail with a bare
/// "no credentials".
fn secret_hint(e: CsiError, secretless: bool, call: &str) -> CsiError {
    match e {
        CsiError::S3 {
            context,
            source: source @ S3Error::NoCredentials(_),
        } if secretless => CsiError::S3 {
            context: format!(
                "{context} (the call carried no Secret: set csi.storage.k8s.io/{call}-secret-name \
                 and csi.storage.k8s.io/{call}-secret-namespace in the StorageClass, or give \
                 the controller credentials of its own)"
            ),
            source,
        },
        e => e,
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        // Whose identity mounts use is the StorageClass's word, carried to the node in the
        // volume context (checked here, so a bad setting fails the claim, not every mount).
        params::AuthSource::parse(&req.parameters)?;
        let identity: Vec<(String, String)> = req
            .parameters
            .iter()
            .filter(|(k, v)| {
                (params::IDENTITY_KEYS.contains(&k.as_str())
                    || params::PASSED_KEYS.contains(&k.as_str()))
                    && !v.trim().is_empty()
            })
            .map(|(k, v)| (k.clone(), v.trim().to_owned()))
            .collect();
        let secretless = req.secrets.is_empty();
        let mut volume = self
            .create(req)
            .await
            .map_err(|e| secret_hint(e, secretless, "provisioner"))?;
        volume.volume_context.extend(identity);
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let secretless = req.secrets.is_empty();
        self.delete(req)
            .await
            .map_err(|e| secret_hint(e, secretless, "provisioner"))?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(request.into_inner()).await?))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let secretless = req.secrets.is_empty();
        let response = self
            .expand(req)
            .await
            .map_err(|e| secret_hint(e, secretless, "controller-expand"))?;
        Ok(Response::new(response))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::access_mode::Mode;
    use crate::proto::volume_capability::{AccessMode, AccessType, MountVolume};
    use s3vol_s3::MemStore;
    use tonic::Code;

    #[derive(Debug)]
    struct Mem(Arc<MemStore>);

    #[tonic::async_trait]
    impl StoreFactory for Mem {
        async fn store(&self, _: &Location, _: Option<StaticCredentials>) -> Arc<dyn ObjectStore> {
            self.0.clone()
        }
    }

    fn service() -> (ControllerService, Arc<MemStore>) {
        let mem = Arc::new(MemStore::new());
        (
            ControllerService::new(
                "csi.s3vol.io".into(),
                Defaults::default(),
                Arc::new(Mem(mem.clone())),
            ),
            mem,
        )
    }

    fn caps() -> Vec<VolumeCapability> {
        vec![VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        }]
    }

    fn create_req(name: &str, params: &[(&str, &str)], size: i64) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: caps(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    async fn put(mem: &MemStore, bucket: &str, key: &str) {
        mem.put_object(
            &BucketName::new(bucket).unwrap(),
            key,
            Bytes::from_static(b"x"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }

    async fn keys(mem: &MemStore, bucket: &str) -> Vec<String> {
        mem.list_objects(&BucketName::new(bucket).unwrap(), &ListRequest::default())
            .await
            .map(|p| p.objects.into_iter().map(|o| o.key).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn prefix_volumes_are_idempotent_and_deleted_exactly() {
        let (svc, mem) = service();
        let b = BucketName::new("team").unwrap();
        mem.create_bucket(&b).await.unwrap();
        put(&mem, "team", "other/keep").await;
        put(&mem, "team", "pvc-10").await; // a sibling key sharing the name's characters
        let params = [("mode", "prefix"), ("bucket", "team")];
        let v1 = svc
            .create(create_req("pvc-1", &params, 1 << 30))
            .await
            .unwrap();
        let v2 = svc
            .create(create_req("pvc-1", &params, 1 << 30))
            .await
            .unwrap();
        assert_eq!(v1, v2);
        assert_eq!(
            v1.volume_context.get("prefix").map(String::as_str),
            Some("pvc-1/")
        );
        let e = svc
            .create(create_req("pvc-1", &params, 2 << 30))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        let e = svc
            .create(create_req(
                "pvc-1",
                &[("mode", "prefix"), ("bucket", "team"), ("region", "x")],
                1 << 30,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        for i in 0..2100 {
            put(&mem, "team", &format!("pvc-1/d/{i}")).await;
        }
        svc.delete(DeleteVolumeRequest {
            volume_id: v1.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        assert_eq!(keys(&mem, "team").await, ["other/keep", "pvc-10"]);
        // Again, and unknown ids: fine, and nothing else is touched.
        svc.delete(DeleteVolumeRequest {
            volume_id: v1.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        for id in [
            "datasets",
            "prefix:team/other",
            "bucket:team",
            "bucket:nonexistent",
        ] {
            svc.delete(DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
        }
        assert_eq!(keys(&mem, "team").await, ["other/keep", "pvc-10"]);
    }

    #[tokio::test]
    async fn foreign_data_is_never_claimed() {
        let (svc, mem) = service();
        mem.create_bucket(&BucketName::new("team").unwrap())
            .await
            .unwrap();
        put(&mem, "team", "pvc-2/existing").await;
        let e = svc
            .create(create_req(
                "pvc-2",
                &[("mode", "prefix"), ("bucket", "team")],
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        mem.create_bucket(&BucketName::new("pvc-3").unwrap())
            .await
            .unwrap();
        put(&mem, "pvc-3", "data").await;
        let e = svc
            .create(create_req("pvc-3", &[("mode", "bucket")], 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        let e = svc
            .create(create_req(
                "pvc-4",
                &[("mode", "prefix"), ("bucket", "missing")],
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn bucket_volumes_lifecycle() {
        let (svc, mem) = service();
        let v = svc
            .create(create_req("pvc-5", &[("mode", "bucket")], 0))
            .await
            .unwrap();
        assert_eq!(v.volume_id, "bucket:pvc-5");
        put(&mem, "pvc-5", "a/b").await;
        assert_eq!(
            svc.create(create_req("pvc-5", &[("mode", "bucket")], 0))
                .await
                .unwrap(),
            v
        );
        svc.delete(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        assert!(matches!(
            mem.head_bucket(&BucketName::new("pvc-5").unwrap()).await,
            Err(S3Error::NoSuchBucket(_))
        ));
    }

    /// Records what each store was made for.
    #[derive(Debug, Default)]
    struct Recording {
        mem: Arc<MemStore>,
        made: std::sync::Mutex<Vec<(Location, Option<StaticCredentials>)>>,
    }

    #[tonic::async_trait]
    impl StoreFactory for Recording {
        async fn store(
            &self,
            location: &Location,
            credentials: Option<StaticCredentials>,
        ) -> Arc<dyn ObjectStore> {
            self.made
                .lock()
                .unwrap()
                .push((location.clone(), credentials));
            self.mem.clone()
        }
    }

    #[tokio::test]
    async fn a_cosi_secret_supplies_keys_bucket_and_location_of_prefix_volumes() {
        let stores = Arc::new(Recording::default());
        let svc =
            ControllerService::new("csi.s3vol.io".into(), Defaults::default(), stores.clone());
        stores
            .mem
            .create_bucket(&BucketName::new("claimed").unwrap())
            .await
            .unwrap();
        let secret: HashMap<String, String> = [
            ("COSI_S3_BUCKET_ID", "claimed"),
            ("COSI_S3_ENDPOINT", "http://cosi:9000"),
            ("COSI_S3_REGION", "eu-west-1"),
            ("COSI_S3_ADDRESSING_STYLE", "path"),
            ("COSI_S3_ACCESS_KEY_ID", "AK"),
            ("COSI_S3_ACCESS_SECRET_KEY", "SK"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut req = create_req("pvc-8", &[("mode", "prefix")], 0);
        req.secrets = secret.clone();
        let v = svc.create(req).await.unwrap();
        assert_eq!(
            v.volume_context.get("bucket").map(String::as_str),
            Some("claimed")
        );
        let location = Location {
            endpoint: Some("http://cosi:9000".into()),
            region: Some("eu-west-1".into()),
            path_style: true,
        };
        let (made_for, keys) = stores.made.lock().unwrap()[0].clone();
        assert_eq!(made_for, location);
        assert_eq!(keys.unwrap().access_key_id, "AK");
        svc.delete(DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: secret,
        })
        .await
        .unwrap();
        let (made_for, keys) = stores.made.lock().unwrap()[1].clone();
        assert_eq!(made_for, location);
        assert_eq!(keys.unwrap().secret_access_key, "SK");
    }

    #[tokio::test]
    async fn request_validation() {
        let (svc, _) = service();
        let mut r = create_req("", &[("mode", "bucket")], 0);
        assert_eq!(
            svc.create(r.clone()).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        r.name = "x".into();
        r.volume_capabilities.clear();
        assert_eq!(
            svc.create(r).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let mut r = create_req("pvc-6", &[("mode", "bucket")], 0);
        r.capacity_range = Some(CapacityRange {
            required_bytes: 10,
            limit_bytes: 5,
        });
        assert_eq!(svc.create(r).await.unwrap_err().code(), Code::OutOfRange);
        let e = svc
            .delete(DeleteVolumeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = svc
            .create(create_req("pvc\0x", &[("mode", "bucket")], 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = svc
            .delete(DeleteVolumeRequest {
                volume_id: "bucket:a\0b".into(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = svc
            .create(create_req(
                "pvc-r1",
                &[("mode", "bucket"), ("region", "--read-only")],
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("region"), "{e}");
        let validate = |id: &str| ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps(),
            ..Default::default()
        };
        for id in ["unknown", "bucket:pvc-7", "prefix:team/pvc-7"] {
            let e = svc.validate(validate(id)).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{id}");
        }
        let v = svc
            .create(create_req("pvc-7", &[("mode", "bucket")], 0))
            .await
            .unwrap();
        let ok = svc.validate(validate(&v.volume_id)).await.unwrap();
        assert!(ok.confirmed.is_some());
        svc.delete(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        let e = svc.validate(validate(&v.volume_id)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }

    fn range(required_bytes: i64, limit_bytes: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes,
            limit_bytes,
        })
    }

    #[tokio::test]
    async fn create_again_with_a_compatible_range_returns_the_volume() {
        let (svc, mem) = service();
        mem.create_bucket(&BucketName::new("team").unwrap())
            .await
            .unwrap();
        let params = [("mode", "prefix"), ("bucket", "team")];
        let v = svc
            .create(create_req("pvc-r", &params, 10 << 20))
            .await
            .unwrap();
        assert_eq!(v.capacity_bytes, 10 << 20);
        for (r, ok) in [
            (None, true),
            (range(0, 0), true),
            (range(5 << 20, 0), true),
            (range(10 << 20, 10 << 20), true),
            (range(1, 20 << 20), true),
            (range(0, 10 << 20), true),
            (range(11 << 20, 0), false),
            (range(0, 9 << 20), false),
        ] {
            let mut req = create_req("pvc-r", &params, 0);
            req.capacity_range = r;
            match svc.create(req).await {
                Ok(again) if ok => assert_eq!(again, v, "{r:?}"),
                Err(e) if !ok => assert_eq!(e.code(), Code::AlreadyExists, "{r:?}"),
                other => panic!("{r:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn expansion_is_recorded_and_needs_no_node() {
        let (svc, mem) = service();
        let v = svc
            .create(create_req("pvc-x", &[("mode", "bucket")], 1 << 20))
            .await
            .unwrap();
        let expand = |id: &str, r: Option<CapacityRange>| ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: r,
            ..Default::default()
        };
        let got = svc
            .expand(expand(&v.volume_id, range(3 << 20, 0)))
            .await
            .unwrap();
        assert_eq!(got.capacity_bytes, 3 << 20);
        assert!(!got.node_expansion_required);
        let marker = read_marker(&*mem, &BucketName::new("pvc-x").unwrap(), MARKER)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(marker.capacity_bytes, 3 << 20);
        // The same size again, or less: the recorded size, nothing written.
        for r in [range(3 << 20, 0), range(2 << 20, 0)] {
            let got = svc.expand(expand(&v.volume_id, r)).await.unwrap();
            assert_eq!(got.capacity_bytes, 3 << 20);
        }
        // CreateVolume with the original range now finds a larger, still compatible volume.
        let again = svc
            .create(create_req("pvc-x", &[("mode", "bucket")], 1 << 20))
            .await
            .unwrap();
        assert_eq!(again.capacity_bytes, 3 << 20);
        let e = svc
            .expand(expand(&v.volume_id, range(0, 2 << 20)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        let e = svc.expand(expand(&v.volume_id, None)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        for id in ["bucket:never-made", "static-volume"] {
            let e = svc.expand(expand(id, range(1, 0))).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{id}");
        }
    }
}
