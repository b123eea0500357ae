//! `IPC::Manager::Serializer::JSON::Zstd`: the JSON of [`super::json`] in
//! one zstd frame that records its decompressed size (one-shot
//! compression, as the Perl serializer produces), optionally with a
//! dictionary shared by every client of the route.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::error::{Error, Result};

/// The zstd level Perl uses unless configured otherwise.
pub const DEFAULT_LEVEL: i32 = 3;

/// Largest decompressed payload accepted (a hostile frame header cannot
/// make the decoder allocate more).
pub const MAX_DECOMPRESSED: usize = crate::wire::DEFAULT_MAX_FRAME;

/// Compression settings and reusable contexts.
pub struct ZstdCodec {
    level: i32,
    dictionary: Option<PathBuf>,
    compressor: Mutex<zstd::bulk::Compressor<'static>>,
    decompressor: Mutex<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for ZstdCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdCodec")
            .field("level", &self.level)
            .field("dictionary", &self.dictionary)
            .finish()
    }
}

impl PartialEq for ZstdCodec {
    fn eq(&self, other: &Self) -> bool {
        self.level == other.level && self.dictionary == other.dictionary
    }
}

impl Eq for ZstdCodec {}

impl ZstdCodec {
    /// A codec at `level`, with the raw dictionary file at `dictionary`.
    pub fn new(level: i32, dictionary: Option<&Path>) -> Result<Arc<Self>> {
        let dict = match dictionary {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                Error::io(format!("Cannot read zstd dictionary '{}'", p.display()), e)
            })?),
            None => None,
        };
        let (compressor, decompressor) = match &dict {
            Some(d) => (
                zstd::bulk::Compressor::with_dictionary(level, d).map_err(|_| {
                    Error::Serialize("Failed to compress payload with zstd dictionary".into())
                })?,
                zstd::bulk::Decompressor::with_dictionary(d)
                    .map_err(|_| Error::Serialize("Failed to decompress zstd payload".into()))?,
            ),
            None => (
                zstd::bulk::Compressor::new(level)
                    .map_err(|_| Error::Serialize("Failed to compress payload with zstd".into()))?,
                zstd::bulk::Decompressor::new()
                    .map_err(|_| Error::Serialize("Failed to decompress zstd payload".into()))?,
            ),
        };
        Ok(Arc::new(ZstdCodec {
            level,
            dictionary: dictionary.map(Path::to_path_buf),
            compressor: Mutex::new(compressor),
            decompressor: Mutex::new(decompressor),
        }))
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// The dictionary path, if any.
    pub fn dictionary(&self) -> Option<&Path> {
        self.dictionary.as_deref()
    }

    /// Compresses `json` into one frame appended to `out`.
    pub fn compress(&self, json: &[u8], out: &mut BytesMut) -> Result<()> {
        let failed = || {
            Error::Serialize(if self.dictionary.is_some() {
                "Failed to compress payload with zstd dictionary".into()
            } else {
                "Failed to compress payload with zstd".into()
            })
        };
        let mut c = self.compressor.lock().unwrap_or_else(|p| p.into_inner());
        let frame = c.compress(json).map_err(|_| failed())?;
        out.extend_from_slice(&frame);
        Ok(())
    }

    /// Decompresses one frame; its header must state the content size.
    pub fn decompress(&self, payload: &[u8]) -> std::result::Result<Bytes, String> {
        const FAILED: &str = "Failed to decompress zstd payload";
        let size = match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(format!("{FAILED} (no content size in the frame header)")),
            Err(_) => return Err(FAILED.into()),
        };
        if size > MAX_DECOMPRESSED as u64 {
            return Err(format!(
                "{FAILED} (content size {size} exceeds {MAX_DECOMPRESSED} bytes)"
            ));
        }
        let mut d = self.decompressor.lock().unwrap_or_else(|p| p.into_inner());
        let out = d
            .decompress(payload, size as usize)
            .map_err(|_| FAILED.to_string())?;
        if out.len() as u64 != size {
            return Err(FAILED.into());
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_content_size_and_round_trip() {
        let c = ZstdCodec::new(DEFAULT_LEVEL, None).unwrap();
        let mut out = BytesMut::new();
        c.compress(br#"{"hello":"cli"}"#, &mut out).unwrap();
        assert_eq!(&out[..4], &[0x28, 0xB5, 0x2F, 0xFD], "zstd magic");
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&out).unwrap(),
            Some(15)
        );
        assert_eq!(&c.decompress(&out).unwrap()[..], br#"{"hello":"cli"}"#);
        // The reference decoder reads it too.
        assert_eq!(
            zstd::stream::decode_all(&out[..]).unwrap(),
            br#"{"hello":"cli"}"#
        );
    }

    #[test]
    fn hostile_frames_are_refused_without_allocating() {
        let c = ZstdCodec::new(DEFAULT_LEVEL, None).unwrap();
        assert!(c.decompress(b"not zstd").is_err());
        // A frame header claiming 2^40 bytes.
        let mut lie = vec![0x28, 0xB5, 0x2F, 0xFD, 0xC0];
        lie.extend_from_slice(&(1u64 << 40).to_le_bytes());
        lie.extend_from_slice(&[0; 8]);
        let e = c.decompress(&lie).unwrap_err();
        assert!(e.starts_with("Failed to decompress zstd payload"), "{e}");
        // A stream without content size (streaming compressor).
        let streamed = {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            std::io::Write::write_all(&mut enc, b"{}").unwrap();
            enc.finish().unwrap()
        };
        assert!(c.decompress(&streamed).is_err());
    }

    #[test]
    fn dictionary_is_used_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dict");
        std::fs::write(
            &path,
            b"\"from\":\"content\":\"stamp\":\"stamp_ord\":".repeat(20),
        )
        .unwrap();
        let c = ZstdCodec::new(9, Some(&path)).unwrap();
        let mut out = BytesMut::new();
        c.compress(br#"{"from":"a","content":1}"#, &mut out)
            .unwrap();
        assert_eq!(
            &c.decompress(&out).unwrap()[..],
            br#"{"from":"a","content":1}"#
        );
        assert_eq!(c.level(), 9);
    }
}
