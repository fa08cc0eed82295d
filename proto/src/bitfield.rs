//! Bitfields: which pieces of a blob a peer holds.

use bincode::de::Decoder;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};
use bitvec::prelude::*;

use crate::ProtoError;

/// A fixed-length set of piece indices (bit `i` set = piece `i` held).
/// On the wire: the bit count, then the bytes, most significant bit first.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bits: BitVec<u8, Msb0>,
}

impl Bitfield {
    /// An empty bitfield of `len` pieces.
    pub fn new(len: u32) -> Self {
        Self { bits: bitvec![u8, Msb0; 0; len as usize] }
    }

    /// A bitfield of `len` pieces, all set. The spare bits of the last byte stay
    /// zero: `bitvec![u8, Msb0; 1; len]` would set them too (only a clone would
    /// clear them), and a receiver rejects such a bitfield.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        b.bits.fill(true);
        b
    }

    /// Rebuilds a bitfield from its wire bytes; spare bits in the last byte must be zero.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, ProtoError> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return Err(ProtoError::InvalidBitfield { len, bytes: bytes.len() });
        }
        let mut bits = BitVec::<u8, Msb0>::from_slice(bytes);
        if bits[len as usize..].any() {
            return Err(ProtoError::InvalidBitfield { len, bytes: bytes.len() });
        }
        bits.truncate(len as usize);
        Ok(Self { bits })
    }

    /// The wire bytes (spare bits zero).
    pub fn as_bytes(&self) -> &[u8] {
        self.bits.as_raw_slice()
    }

    /// Number of pieces this bitfield covers.
    pub fn len(&self) -> u32 {
        self.bits.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Whether piece `i` is held (false when out of range).
    pub fn get(&self, i: u32) -> bool {
        self.bits.get(i as usize).is_some_and(|b| *b)
    }

    /// Marks piece `i` held or not; out-of-range indices are ignored and return false.
    pub fn set(&mut self, i: u32, value: bool) -> bool {
        match self.bits.get_mut(i as usize) {
            Some(mut b) => {
                *b = value;
                true
            }
            None => false,
        }
    }

    /// Number of pieces held.
    pub fn count(&self) -> u32 {
        self.bits.count_ones() as u32
    }

    /// Whether every piece is held.
    pub fn is_complete(&self) -> bool {
        self.bits.all()
    }

    /// Indices of held pieces, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter_ones().map(|i| i as u32)
    }

    /// Indices of missing pieces, ascending.
    pub fn zeros(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter_zeros().map(|i| i as u32)
    }
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.count(), self.len())
    }
}

impl Encode for Bitfield {
    fn encode<E: Encoder>(&self, encoder: &mut E) -> Result<(), EncodeError> {
        self.len().encode(encoder)?;
        self.as_bytes().to_vec().encode(encoder)
    }
}

impl<Ctx> Decode<Ctx> for Bitfield {
    fn decode<D: Decoder<Context = Ctx>>(decoder: &mut D) -> Result<Self, DecodeError> {
        let len = u32::decode(decoder)?;
        let bytes = Vec::<u8>::decode(decoder)?;
        Self::from_bytes(len, &bytes).map_err(|e| DecodeError::OtherString(e.to_string()))
    }
}

bincode::impl_borrow_decode!(Bitfield);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let mut b = Bitfield::new(10);
        assert_eq!(b.count(), 0);
        assert!(b.set(3, true));
        assert!(b.set(9, true));
        assert!(!b.set(10, true));
        assert!(b.get(3) && b.get(9) && !b.get(4) && !b.get(10));
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(b.as_bytes(), &[0b0001_0000, 0b0100_0000]);
        assert_eq!(Bitfield::from_bytes(10, b.as_bytes()), Ok(b.clone()));
        assert!(Bitfield::full(10).is_complete());
    }

    #[test]
    fn a_full_bitfield_has_no_spare_bits_and_decodes() {
        for len in 0..=17 {
            let full = Bitfield::full(len);
            assert_eq!(full.count(), len);
            assert_eq!(Bitfield::from_bytes(len, full.as_bytes()), Ok(full.clone()), "{len} pieces");
            // Encoded as built (a clone would clear spare bits and hide the bug).
            let frame =
                crate::codec::encode_frame(&crate::msg::PeerMessage::Bitfield(Bitfield::full(len))).expect("encode");
            let body = &frame[4..];
            let back: crate::msg::PeerMessage =
                crate::codec::decode_body(body, crate::codec::MAX_PEER_FRAME_LEN).expect("decode");
            assert_eq!(back, crate::msg::PeerMessage::Bitfield(full), "{len} pieces");
        }
        assert_eq!(Bitfield::full(10).as_bytes(), &[0xFF, 0b1100_0000]);
    }

    #[test]
    fn from_bytes_rejects_bad_lengths_and_spare_bits() {
        assert!(Bitfield::from_bytes(10, &[0]).is_err());
        assert!(Bitfield::from_bytes(10, &[0, 0, 0]).is_err());
        assert!(Bitfield::from_bytes(10, &[0, 0b0010_0000]).is_err());
        assert!(Bitfield::from_bytes(0, &[]).is_ok());
    }
}
