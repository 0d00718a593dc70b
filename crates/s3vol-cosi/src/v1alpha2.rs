//! The `sigs.k8s.io.cosi.v1alpha2` services: the current upstream COSI protocol.
//!
//! Only the S3 protocol and `KEY` authentication are supported; asking for another protocol or
//! for `SERVICE_ACCOUNT` authentication is `InvalidArgument`, as the protocol requires. Grants
//! may name several buckets (one IAM policy covers them all), so `OUT_OF_RANGE` is never
//! returned.
//!
//! Access mode: in the upstream revision `proto/cosi/v1alpha2/cosi.proto` follows, the
//! `AccessMode` message has no field, so no mode reaches the driver on the wire; the
//! BucketAccessClass parameter `accessMode` decides (default read-write). Add the field to the
//! proto when upstream adds it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::driver::{AccessedBucket, BucketInfo, Driver};
use crate::error::CosiError;
use crate::params::Addressing;
use crate::proto::v1alpha2 as pb;

/// Both v1alpha2 services over one driver.
#[derive(Clone, Debug)]
pub struct V1alpha2 {
    driver: Arc<Driver>,
}

impl V1alpha2 {
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
    tracing::warn!(protocol = "v1alpha2", call, code = ?e.code(), error = ?e.to_string(), "COSI call failed");
    e.into()
}

/// Refuses any protocol but S3 (an unset protocol means S3).
fn check_protocol(p: Option<&pb::ObjectProtocol>) -> Result<(), CosiError> {
    use pb::object_protocol::Type;
    match p.map(|p| p.r#type()) {
        None | Some(Type::S3 | Type::Unknown) => Ok(()),
        Some(other) => Err(CosiError::InvalidArgument(format!(
            "protocol {} is not supported; this driver serves S3",
            other.as_str_name()
        ))),
    }
}

fn check_protocols(ps: &[pb::ObjectProtocol]) -> Result<(), CosiError> {
    ps.iter().try_for_each(|p| check_protocol(Some(p)))
}

fn check_authentication(a: Option<&pb::AuthenticationType>) -> Result<(), CosiError> {
    use pb::authentication_type::Type;
    match a.map(|a| a.r#type()) {
        None | Some(Type::Key | Type::Unknown) => Ok(()),
        Some(Type::ServiceAccount) => Err(CosiError::InvalidArgument(
            "authentication type SERVICE_ACCOUNT is not supported by this driver; use KEY".into(),
        )),
    }
}

fn s3_info(info: BucketInfo) -> pb::ObjectProtocolAndBucketInfo {
    let style = match info.addressing {
        Addressing::Path => pb::s3_addressing_style::Style::Path,
        Addressing::Virtual => pb::s3_addressing_style::Style::Virtual,
    };
    pb::ObjectProtocolAndBucketInfo {
        s3: Some(pb::S3BucketInfo {
            bucket_id: info.bucket_id,
            endpoint: info.endpoint,
            region: info.region,
            addressing_style: Some(pb::S3AddressingStyle {
                style: style as i32,
            }),
        }),
        azure: None,
        gcs: None,
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for V1alpha2 {
    async fn driver_get_info(
        &self,
        _request: Request<pb::DriverGetInfoRequest>,
    ) -> Result<Response<pb::DriverGetInfoResponse>, Status> {
        Ok(Response::new(pb::DriverGetInfoResponse {
            name: self.driver.name().to_owned(),
            supported_protocols: vec![pb::ObjectProtocol {
                r#type: pb::object_protocol::Type::S3 as i32,
            }],
        }))
    }
}

#[tonic::async_trait]
impl pb::provisioner_server::Provisioner for V1alpha2 {
    async fn driver_create_bucket(
        &self,
        request: Request<pb::DriverCreateBucketRequest>,
    ) -> Result<Response<pb::DriverCreateBucketResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha2",
            name = req.name.as_str(),
            "DriverCreateBucket"
        );
        let call = "DriverCreateBucket";
        check_protocols(&req.protocols).map_err(|e| log_failure(call, e))?;
        let info = self
            .driver
            .create_bucket(&req.name, &req.parameters)
            .await
            .map_err(|e| log_failure(call, e))?;
        Ok(Response::new(pb::DriverCreateBucketResponse {
            bucket_id: info.bucket_id.clone(),
            protocols: Some(s3_info(info)),
        }))
    }

    async fn driver_get_existing_bucket(
        &self,
        request: Request<pb::DriverGetExistingBucketRequest>,
    ) -> Result<Response<pb::DriverGetExistingBucketResponse>, Status> {
        let req = request.into_inner();
        let call = "DriverGetExistingBucket";
        tracing::info!(
            protocol = "v1alpha2",
            bucket = req.existing_bucket_id.as_str(),
            "{call}"
        );
        check_protocols(&req.protocols).map_err(|e| log_failure(call, e))?;
        let info = self
            .driver
            .get_existing_bucket(&req.existing_bucket_id, &req.parameters)
            .await
            .map_err(|e| log_failure(call, e))?;
        Ok(Response::new(pb::DriverGetExistingBucketResponse {
            bucket_id: info.bucket_id.clone(),
            protocols: Some(s3_info(info)),
        }))
    }

    async fn driver_delete_bucket(
        &self,
        request: Request<pb::DriverDeleteBucketRequest>,
    ) -> Result<Response<pb::DriverDeleteBucketResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(
            protocol = "v1alpha2",
            bucket = req.bucket_id.as_str(),
            "DriverDeleteBucket"
        );
        self.driver
            .delete_bucket(&req.bucket_id, &req.parameters)
            .await
            .map_err(|e| log_failure("DriverDeleteBucket", e))?;
        Ok(Response::new(pb::DriverDeleteBucketResponse {}))
    }

    async fn driver_grant_bucket_access(
        &self,
        request: Request<pb::DriverGrantBucketAccessRequest>,
    ) -> Result<Response<pb::DriverGrantBucketAccessResponse>, Status> {
        let req = request.into_inner();
        let call = "DriverGrantBucketAccess";
        tracing::info!(
            protocol = "v1alpha2",
            account = req.account_name.as_str(),
            buckets = req.buckets.len(),
            "{call}"
        );
        check_protocol(req.protocol.as_ref()).map_err(|e| log_failure(call, e))?;
        check_authentication(req.authentication_type.as_ref()).map_err(|e| log_failure(call, e))?;
        let accessed: Vec<AccessedBucket> = req
            .buckets
            .iter()
            .map(|b| AccessedBucket {
                bucket_id: b.bucket_id.clone(),
                mode: None,
            })
            .collect();
        let grant = self
            .driver
            .grant(&req.account_name, &accessed, &req.parameters)
            .await
            .map_err(|e| log_failure(call, e))?;
        Ok(Response::new(pb::DriverGrantBucketAccessResponse {
            account_id: grant.account_id,
            buckets: grant
                .buckets
                .into_iter()
                .map(|info| pb::driver_grant_bucket_access_response::BucketInfo {
                    bucket_id: info.bucket_id.clone(),
                    bucket_info: Some(s3_info(info)),
                })
                .collect(),
            credentials: Some(pb::CredentialInfo {
                s3: Some(pb::S3CredentialInfo {
                    access_key_id: grant.access_key_id,
                    access_secret_key: grant.secret_access_key,
                }),
                azure: None,
                gcs: None,
            }),
        }))
    }

    async fn driver_revoke_bucket_access(
        &self,
        request: Request<pb::DriverRevokeBucketAccessRequest>,
    ) -> Result<Response<pb::DriverRevokeBucketAccessResponse>, Status> {
        let req = request.into_inner();
        let call = "DriverRevokeBucketAccess";
        tracing::info!(
            protocol = "v1alpha2",
            account = req.account_id.as_str(),
            "{call}"
        );
        self.driver
            .revoke(&req.account_id, &req.parameters)
            .await
            .map_err(|e| log_failure(call, e))?;
        Ok(Response::new(pb::DriverRevokeBucketAccessResponse {}))
    }
}
