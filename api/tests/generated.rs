//! The generated client and server are usable with the tonic features this
//! crate enables: a server implementation type-checks and wraps into
//! `ControlPlaneServer`, and the client names the transport channel.

use tonic::codegen::BoxStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use weft_api::v1::{RegisterRequest, RegisterResponse, SubscribeRequest, SubscribeResponse};

struct Unimplemented;

#[tonic::async_trait]
impl ControlPlane for Unimplemented {
    type RegisterStream = BoxStream<RegisterResponse>;
    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn register(
        &self,
        _: Request<Streaming<RegisterRequest>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn subscribe(
        &self,
        _: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("test"))
    }
}

#[test]
fn server_and_client_are_generated() {
    let _server = ControlPlaneServer::new(Unimplemented).max_decoding_message_size(1 << 20);
    assert_eq!(
        <ControlPlaneServer<Unimplemented> as NamedService>::NAME,
        "weft.v1.ControlPlane"
    );
    fn takes_client(_: Option<ControlPlaneClient<tonic::transport::Channel>>) {}
    takes_client(None);
}
