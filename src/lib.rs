//! Protobuf API of the registry, with the tonic client and server types
//! generated from `proto/` at build time.
//!
//! - [`v1`]: `registry.v1.Registry`, the service discovery API.
//! - [`prod`]: the `ProdService` example that registers itself and is found
//!   by name.
//! - [`bench`]: a no-op echo service the load generator uses as its ceiling.
//! - [`etcd`]: the subset of etcd's v3 API the registry's etcd store uses.
//! - [`FILE_DESCRIPTOR_SET`]: every file above, for server reflection.

#![allow(missing_docs, unreachable_pub, missing_debug_implementations)]

/// `registry.v1`: the registry's gRPC API.
pub mod v1 {
    tonic::include_proto!("registry.v1");
    // serde (proto3 JSON mapping) for every message, for the HTTP API.
    include!(concat!(env!("OUT_DIR"), "/registry.v1.serde.rs"));
}

/// `prod.v1`: the example product-stock service.
pub mod prod {
    tonic::include_proto!("prod.v1");
}

/// `bench.v1`: no-op service measuring tonic's own ceiling.
pub mod bench {
    tonic::include_proto!("bench.v1");
}

/// etcd's v3 API (KV, Watch, Lease; `proto/etcd/`), client side, for the
/// registry's `--store etcd`. Generated here with protox like the rest, so
/// no system `protoc` is needed.
pub mod etcd {
    /// `etcdserverpb`: the KV, Watch and Lease services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// `mvccpb`: keys, values and watch events.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
}

/// Encoded `FileDescriptorSet` of every proto in this crate, so the daemon
/// can serve reflection and tools like grpcurl work without the .proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/registry_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_decodes_and_names_the_service() {
        let fds = prost_types_shim::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let names: Vec<_> = fds.file.iter().map(|f| f.name.clone()).collect();
        assert!(
            names.iter().any(|n| n == "registry/v1/registry.proto"),
            "{names:?}"
        );
    }

    /// Minimal mirror of descriptor.proto, enough to check the set decodes.
    mod prost_types_shim {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FileDescriptorSet {
            #[prost(message, repeated, tag = "1")]
            pub file: Vec<FileDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FileDescriptorProto {
            #[prost(string, tag = "1")]
            pub name: String,
        }
    }
}
