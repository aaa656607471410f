//! A decompressing copy of a compressed response, for the observer only: the client
//! gets the compressed bytes as sent. Output is capped, so a small body that inflates
//! to gigabytes costs no more than the cap; past it the copy stops and usage is
//! estimated.

use std::io::Write;

use bytes::Bytes;

/// Most decompressed bytes read from one response.
pub const MAX_DECODED_BYTES: usize = 16 * 1024 * 1024;

/// Collects decoder output, refusing more than its cap.
struct CappedSink {
    buf: Vec<u8>,
    total: usize,
}

impl Write for CappedSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.total + data.len() > MAX_DECODED_BYTES {
            return Err(std::io::Error::other("decompressed response over the cap"));
        }
        self.total += data.len();
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Inner {
    Gzip(flate2::write::GzDecoder<CappedSink>),
    Deflate(flate2::write::ZlibDecoder<CappedSink>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<CappedSink>>),
}

/// Decodes one response body frame by frame.
pub struct Decoder {
    inner: Option<Inner>,
}

impl Decoder {
    /// A decoder for a `content-encoding` value; `None` for identity. Unknown encodings
    /// give a decoder that yields nothing (the usage is then estimated).
    pub fn for_encoding(encoding: &str) -> Option<Decoder> {
        let sink = || CappedSink {
            buf: Vec::new(),
            total: 0,
        };
        let inner = match encoding.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => return None,
            "gzip" | "x-gzip" => Some(Inner::Gzip(flate2::write::GzDecoder::new(sink()))),
            "deflate" => Some(Inner::Deflate(flate2::write::ZlibDecoder::new(sink()))),
            "br" => Some(Inner::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(sink(), 4096),
            ))),
            _ => None,
        };
        Some(Decoder { inner })
    }

    /// Feeds compressed bytes; returns what they decompress to (possibly nothing).
    pub fn decode(&mut self, data: &[u8]) -> Bytes {
        let Some(inner) = &mut self.inner else {
            return Bytes::new();
        };
        let (written, sink) = match inner {
            Inner::Gzip(d) => (d.write_all(data).and_then(|()| d.flush()), d.get_mut()),
            Inner::Deflate(d) => (d.write_all(data).and_then(|()| d.flush()), d.get_mut()),
            Inner::Brotli(d) => (d.write_all(data).and_then(|()| d.flush()), d.get_mut()),
        };
        let out = Bytes::from(std::mem::take(&mut sink.buf));
        if written.is_err() {
            // Corrupt input or over the cap: stop reading this body.
            self.inner = None;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_and_deflate_decode_across_any_split() {
        let text = b"{\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}".repeat(10);
        let gz = gzip(&text);
        for split in [1, 5, 17, gz.len()] {
            let mut d = Decoder::for_encoding("gzip").unwrap();
            let out: Vec<u8> = gz
                .chunks(split)
                .flat_map(|c| d.decode(c).to_vec())
                .collect();
            assert_eq!(out, text, "split {split}");
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&text).unwrap();
        let mut d = Decoder::for_encoding("deflate").unwrap();
        assert_eq!(d.decode(&z.finish().unwrap()).to_vec(), text);
        assert!(Decoder::for_encoding("identity").is_none());
    }

    #[test]
    fn brotli_decodes() {
        // "hello" compressed with brotli (quality 11).
        let br = [0x0b, 0x02, 0x80, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x03];
        let mut d = Decoder::for_encoding("br").unwrap();
        assert_eq!(&d.decode(&br)[..], b"hello");
    }

    #[test]
    fn a_bomb_is_cut_at_the_cap() {
        let bomb = gzip(&vec![b'a'; MAX_DECODED_BYTES + 1024 * 1024]);
        let mut d = Decoder::for_encoding("gzip").unwrap();
        let mut total = 0;
        for chunk in bomb.chunks(8192) {
            total += d.decode(chunk).len();
        }
        assert!(total <= MAX_DECODED_BYTES, "{total}");
    }

    #[test]
    fn garbage_and_unknown_encodings_yield_nothing() {
        let mut d = Decoder::for_encoding("gzip").unwrap();
        assert!(d.decode(b"not gzip at all").is_empty());
        assert!(d.decode(b"more").is_empty());
        let mut z = Decoder::for_encoding("zstd").unwrap();
        assert!(z.decode(b"whatever").is_empty());
    }
}
