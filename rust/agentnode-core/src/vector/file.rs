//! The collection file: `MAGIC | sections | crc32`, each section a u64 length and its bytes,
//! written atomically (temporary file, fsync, rename, directory fsync). Version 1 holds two
//! sections (index, labels); version 2 adds a third, the exact vectors of an `i8+f32`
//! collection (empty for other dtypes); in version 3 that section starts with the scale of an
//! `i8+f32` graph (see [`super::i8_scale`]; version 2's graphs used usearch's cast).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::{Error, Result};

/// The magic without its last byte, the version.
const MAGIC: &[u8; 7] = b"ANVEC\x00\x00";
const VERSION: u8 = 3;
/// The first version whose `i8+f32` graph uses this build's quantisation.
pub(super) const QUANTISED_SINCE: u8 = 3;
/// Sections since version 2 (version 1 files are read as having an empty third).
pub(super) const SECTIONS: usize = 3;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

pub(super) fn write_atomic(path: &Path, sections: [&[u8]; SECTIONS]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(name);
    let mut crc = crc32fast::Hasher::new();
    let written = (|| {
        let mut f = File::create(&tmp)?;
        let mut put = |part: &[u8]| {
            crc.update(part);
            f.write_all(part)
        };
        put(MAGIC)?;
        put(&[VERSION])?;
        for section in sections {
            put(&(section.len() as u64).to_le_bytes())?;
            put(section)?;
        }
        f.write_all(&crc.clone().finalize().to_le_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("rename into place", path)(e)
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// The sections of a file whose checksum holds, and its version.
pub(super) fn read_checked(path: &Path) -> Result<([Vec<u8>; SECTIONS], u8)> {
    let data = fs::read(path).map_err(io("read", path))?;
    let corrupt = |why: &str| Error::Corrupt {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let (version, present) = match data.split_at_checked(MAGIC.len()) {
        Some((m, rest)) if m == MAGIC => match rest.first() {
            Some(1) => (1, 2),
            Some(&v @ 2..=VERSION) => (v, SECTIONS),
            Some(v) if *v > VERSION => return Err(corrupt("written by a newer agentnode")),
            _ => return Err(corrupt("not an agentnode vector file")),
        },
        _ => return Err(corrupt("not an agentnode vector file")),
    };
    if data.len() < MAGIC.len() + 1 + 8 * present + 4 {
        return Err(corrupt("short file"));
    }
    let (body, tail) = data.split_at(data.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().map_err(|_| corrupt("short file"))?);
    if crc32fast::hash(body) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    let section = |at: usize| -> Result<(Vec<u8>, usize)> {
        let len_end = at + 8;
        let len = body
            .get(at..len_end)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| corrupt("truncated section header"))? as usize;
        let bytes = body
            .get(len_end..len_end.saturating_add(len))
            .ok_or_else(|| corrupt("truncated section"))?;
        Ok((bytes.to_vec(), len_end + len))
    };
    let mut out: [Vec<u8>; SECTIONS] = Default::default();
    let mut at = MAGIC.len() + 1;
    for slot in &mut out[..present] {
        (*slot, at) = section(at)?;
    }
    if at != body.len() {
        return Err(corrupt("trailing bytes"));
    }
    Ok((out, version))
}
