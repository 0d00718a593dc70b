//! The Identity service: the driver's name and version, its capabilities, and readiness.
//!
//! Probe answers `ready: true` only when every role this process serves can serve: the
//! controller always can; the node role needs its state directory adopted, `/dev/fuse` and a
//! mounter that answers (see `node::NodeService::ready`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::NodeService;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The Identity service of one driver process.
#[derive(Debug)]
pub struct IdentityService {
    pub(crate) name: String,
    pub(crate) controller: bool,
    pub(crate) node: Option<Arc<NodeService>>,
}

impl IdentityService {
    pub fn new(name: String, controller: bool, node: Option<Arc<NodeService>>) -> Self {
        Self {
            name,
            controller,
            node,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // CONTROLLER_SERVICE is a property of the driver, not of this process: a node-only
        // process still belongs to a driver that has a controller.
        // VolumeExpansion ONLINE: ControllerExpandVolume records the new size while the volume
        // is in use; nothing changes on the node.
        let capabilities = vec![
            PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: service::Type::ControllerService as i32,
                    },
                )),
            },
            PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: plugin_capability::volume_expansion::Type::Online as i32,
                    },
                )),
            },
        ];
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = match &self.node {
            Some(node) => node.ready().await,
            None => self.controller,
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
