//! Pre-encoded unary responses. Resolve is a hot path whose answer, for a
//! given service revision, is the same bytes for every caller: the instance
//! list is encoded once per service snapshot and shared, and only the small
//! per-call tail (revision, server info) is encoded per request. On the wire
//! a [`ResolveFrame`] is exactly a `registry.v1.ResolveResponse`.

use bytes::{BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};
use registry_api::v1::{Instance, ResolveResponse};

/// A `ResolveResponse` whose `instances` may be shared pre-encoded bytes.
#[derive(Debug, Clone, Default)]
pub struct ResolveFrame {
    /// Field 1 (`instances`) records, already encoded; empty when `rest`
    /// carries the instances itself.
    instances: Bytes,
    /// Everything else (and, when built from a message, the instances).
    rest: ResolveResponse,
}

impl ResolveFrame {
    /// A frame holding an ordinary message.
    pub fn message(msg: ResolveResponse) -> Self {
        Self {
            instances: Bytes::new(),
            rest: msg,
        }
    }

    /// A frame from shared encoded instance records plus the per-call rest
    /// (whose own `instances` must be empty).
    pub fn shared(instances: Bytes, rest: ResolveResponse) -> Self {
        debug_assert!(rest.instances.is_empty());
        Self { instances, rest }
    }

    /// The catalog revision the answer is at.
    pub fn revision(&self) -> u64 {
        self.rest.revision
    }

    /// The response this frame encodes, for in-process callers and tests.
    pub fn to_response(&self) -> Result<ResolveResponse, DecodeError> {
        ResolveResponse::decode(self.encode_to_vec().as_slice())
    }
}

/// Encodes instances as `ResolveResponse.instances` records (field 1), the
/// form [`ResolveFrame::shared`] takes.
pub fn encode_instances<'a>(instances: impl Iterator<Item = &'a Instance>) -> Bytes {
    let mut buf = Vec::new();
    for i in instances {
        prost::encoding::message::encode(1, i, &mut buf);
    }
    buf.into()
}

/// Already-encoded messages as records of the length-delimited field `tag`
/// (e.g. `ResolveResponse.instances`, `Snapshot.instances`): each record is
/// the key, the length and the bytes as they are, nothing re-encoded.
pub fn records<'a>(tag: u32, messages: impl Iterator<Item = &'a [u8]>) -> Bytes {
    let mut buf = Vec::new();
    for m in messages {
        push_record(tag, m, &mut buf);
    }
    buf.into()
}

/// Appends one record of field `tag` holding an encoded message.
pub fn push_record(tag: u32, message: &[u8], buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(message.len() as u64, buf);
    buf.extend_from_slice(message);
}

/// The length of [`push_record`]'s output for a message of `len` bytes.
pub fn record_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

impl Message for ResolveFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.instances);
        self.rest.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.rest.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.instances.len() + self.rest.encoded_len()
    }

    fn clear(&mut self) {
        self.instances = Bytes::new();
        self.rest.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_frame_decodes_as_the_plain_message() {
        let instances: Vec<Instance> = (0..3)
            .map(|i| Instance {
                service: "svc".into(),
                id: format!("i{i}"),
                address: "10.0.0.1:80".into(),
                weight: 1,
                ..Default::default()
            })
            .collect();
        let plain = ResolveResponse {
            instances: instances.clone(),
            revision: 9,
            service_known: true,
            server: None,
            panicked: false,
        };
        let frame = ResolveFrame::shared(
            encode_instances(instances.iter()),
            ResolveResponse {
                revision: 9,
                service_known: true,
                ..Default::default()
            },
        );
        assert_eq!(frame.to_response().unwrap(), plain);
        assert_eq!(frame.encoded_len(), plain.encoded_len());
    }
}
