//! The `cosi.v1alpha1` services: what the released COSI sidecar (v0.1.x, v0.2.x) calls.
//!
//! The sidecar turns a grant's `credentials["s3"]` into the BucketAccess Secret's `BucketInfo`
//! JSON, reading exactly the keys `accessKeyID`, `accessSecretKey`, `endpoint` and `region`.
//! That format has no field for the addressing style or the bucket id: the Secret's
//! `spec.bucketName` is the Kubernetes `Bucket`'s name, which is the S3 bucket's name unless
//! the class sets a prefix or the name had to be shortened (see [`crate::naming`]).
//!
//! The protocol has no access mode: the BucketAccessClass parameter `accessMode` sets it.
//! `AuthenticationType::IAM` (workload identity) is not supported; `Key` (or unset) is.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::driver::{AccessedBucket, Driver};
use crate::error::CosiError;
use crate::proto::v1alpha1 as pb;

/// Keys of `CredentialDetails.secrets` the v1alpha1 sidecar reads.
pub mod secret_keys {
    pub const PROTOCOL: &str = "s3";
    pub const ACCESS_KEY_ID: &str = "accessKeyID";
    pub const ACCESS_SECRET_KEY: &str = "accessSecretKey";
    pub const ENDPOINT: &str = "endpoint";
    pub const REGION: &str = "region";
}

/// Both v1alpha1 services over one driver.
#[derive(Clone, Debug)]
pub struct V1alpha1 {
    driver: Arc<Driver>,
}

impl V1alpha1 {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    pub fn identity_server(&self) -> pb::identity_server::IdentityServer<Self> {
        pb::identity_server::IdentityServer::new(self.clone())
    }

    pub fn provisioner_server(&self) -> pb::provisioner_server::ProvisionerServer<Self> {
        pb::provisioner_server::ProvisionerServer::new(self.clone())
    }
}

fn log_failure(call: &str, e: CosiError) -> Status {
    tracing::warn!(protocol = "v1alpha1", call, code = ?e.code(), error = ?e.to_string(), "COSI call failed");
    e.into()
}

#[tonic::async_trait]
impl pb::identity_server::Identity for V1alpha1 {
    async fn driver_get_info(
        &self,
        _request: Request<pb::DriverGetInfoRequest>,
    ) -> Result<Response<pb::DriverGetInfoResponse>, Status> {
        Ok(Response::new(pb::DriverGetInfoResponse {
            name: self.driver.name().to_owned(),
        }))
    }
}

#[tonic::async_trait]
impl pb::provisioner_server::Provisioner for V1alpha1 {
    async fn driver_create_bucket(
        &self,
        request: Request<pb::DriverCreateBucketRequest>,
    ) -> Result<Response<pb::DriverCreateBucketResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha1",
            name = req.name.as_str(),
            "DriverCreateBucket"
        );
        let info = self
            .driver
            .create_bucket(&req.name, &req.parameters)
            .await
            .map_err(|e| log_failure("DriverCreateBucket", e))?;
        Ok(Response::new(pb::DriverCreateBucketResponse {
            bucket_id: info.bucket_id,
            bucket_info: Some(pb::Protocol {
                r#type: Some(pb::protocol::Type::S3(pb::S3 {
                    region: info.region,
                    signature_version: pb::S3SignatureVersion::S3v4 as i32,
                })),
            }),
        }))
    }

    async fn driver_delete_bucket(
        &self,
        request: Request<pb::DriverDeleteBucketRequest>,
    ) -> Result<Response<pb::DriverDeleteBucketResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha1",
            bucket = req.bucket_id.as_str(),
            "DriverDeleteBucket"
        );
        self.driver
            .delete_bucket(&req.bucket_id, &req.delete_context)
            .await
            .map_err(|e| log_failure("DriverDeleteBucket", e))?;
        Ok(Response::new(pb::DriverDeleteBucketResponse {}))
    }

    async fn driver_grant_bucket_access(
        &self,
        request: Request<pb::DriverGrantBucketAccessRequest>,
    ) -> Result<Response<pb::DriverGrantBucketAccessResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha1",
            bucket = req.bucket_id.as_str(),
            account = req.name.as_str(),
            "DriverGrantBucketAccess"
        );
        if req.authentication_type == pb::AuthenticationType::Iam as i32 {
            return Err(log_failure(
                "DriverGrantBucketAccess",
                CosiError::InvalidArgument(
                    "authenticationType IAM (workload identity) is not supported by this \
                     driver; use Key"
                        .into(),
                ),
            ));
        }
        let grant = self
            .driver
            .grant(
                &req.name,
                &[AccessedBucket {
                    bucket_id: req.bucket_id,
                    mode: None,
                }],
                &req.parameters,
            )
            .await
            .map_err(|e| log_failure("DriverGrantBucketAccess", e))?;
        let (endpoint, region) = grant
            .buckets
            .first()
            .map(|b| (b.endpoint.clone(), b.region.clone()))
            .unwrap_or_default();
        let secrets = HashMap::from([
            (secret_keys::ACCESS_KEY_ID.to_owned(), grant.access_key_id),
            (
                secret_keys::ACCESS_SECRET_KEY.to_owned(),
                grant.secret_access_key,
            ),
            (secret_keys::ENDPOINT.to_owned(), endpoint),
            (secret_keys::REGION.to_owned(), region),
        ]);
        Ok(Response::new(pb::DriverGrantBucketAccessResponse {
            account_id: grant.account_id,
            credentials: HashMap::from([(
                secret_keys::PROTOCOL.to_owned(),
                pb::CredentialDetails { secrets },
            )]),
        }))
    }

    async fn driver_revoke_bucket_access(
        &self,
        request: Request<pb::DriverRevokeBucketAccessRequest>,
    ) -> Result<Response<pb::DriverRevokeBucketAccessResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha1",
            bucket = req.bucket_id.as_str(),
            account = req.account_id.as_str(),
            "DriverRevokeBucketAccess"
        );
        self.driver
            .revoke(&req.account_id, &req.revoke_access_context)
            .await
            .map_err(|e| log_failure("DriverRevokeBucketAccess", e))?;
        Ok(Response::new(pb::DriverRevokeBucketAccessResponse {}))
    }
}
