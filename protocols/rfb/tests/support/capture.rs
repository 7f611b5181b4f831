//! The capture file format shared by the recorder and the tests that replay captures.
//!
//! A capture is gzip of: the line `VZRFBCAP1`, one line of JSON metadata, then records
//! of `direction (b'C' client-to-server | b'S' server-to-client), U64 microseconds since
//! the connection opened, U32 length, bytes`, all big endian, in the order they were
//! sent or received.

use std::io::{Read, Write};

/// Direction of a recorded chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server.
    C2S,
    /// Server to client.
    S2C,
}

/// One chunk as written or read on the socket.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub dir: Dir,
    pub micros: u64,
    pub bytes: Vec<u8>,
}

/// A whole recorded session.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    pub meta: String,
    pub chunks: Vec<Chunk>,
}

const MAGIC: &[u8] = b"VZRFBCAP1\n";

impl Capture {
    pub fn stream(&self, dir: Dir) -> Vec<u8> {
        self.chunks
            .iter()
            .filter(|c| c.dir == dir)
            .flat_map(|c| c.bytes.iter().copied())
            .collect()
    }

    pub fn write_gz(&self, w: impl Write) -> std::io::Result<()> {
        let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::best());
        gz.write_all(MAGIC)?;
        gz.write_all(self.meta.replace('\n', " ").as_bytes())?;
        gz.write_all(b"\n")?;
        for c in &self.chunks {
            gz.write_all(&[match c.dir {
                Dir::C2S => b'C',
                Dir::S2C => b'S',
            }])?;
            gz.write_all(&c.micros.to_be_bytes())?;
            gz.write_all(&(c.bytes.len() as u32).to_be_bytes())?;
            gz.write_all(&c.bytes)?;
        }
        gz.finish()?.flush()
    }

    pub fn read_gz(r: impl Read) -> Result<Capture, String> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(r)
            .read_to_end(&mut raw)
            .map_err(|e| format!("gzip: {e}"))?;
        let rest = raw.strip_prefix(MAGIC).ok_or("not a VZRFBCAP1 capture")?;
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no metadata line")?;
        let meta = String::from_utf8_lossy(&rest[..nl]).into_owned();
        let mut rest = &rest[nl + 1..];
        let mut chunks = Vec::new();
        while !rest.is_empty() {
            if rest.len() < 13 {
                return Err("truncated record header".into());
            }
            let dir = match rest[0] {
                b'C' => Dir::C2S,
                b'S' => Dir::S2C,
                other => return Err(format!("bad direction byte {other}")),
            };
            let micros = u64::from_be_bytes(rest[1..9].try_into().unwrap());
            let len = u32::from_be_bytes(rest[9..13].try_into().unwrap()) as usize;
            let bytes = rest.get(13..13 + len).ok_or("truncated record")?.to_vec();
            chunks.push(Chunk { dir, micros, bytes });
            rest = &rest[13 + len..];
        }
        Ok(Capture { meta, chunks })
    }
}
