//! What one endpoint looks like to a discovery source: plain data, which the
//! control-plane client receives and discovery turns into balancer
//! endpoints. A module of its own (no imports from the crate) so that the
//! control-plane client does not depend on discovery and balancing.

use std::net::SocketAddr;

use weft_api::Health;
use weft_config::Metadata;

/// What one endpoint looks like to a discovery source.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub metadata: Metadata,
    /// Whether the instance's app answers its sidecar's check (control-plane
    /// endpoints); other sources say healthy.
    pub health: Health,
}
