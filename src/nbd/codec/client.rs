//! The client's direction of the handshake, for round trips, tests, fuzz
//! seeds and test clients: whole options (header and data) ready to send.
//! The server never needs these; [`super::option`] decodes what they write.

use super::option::OptionHeader;

/// Appends a whole `INFO` or `GO` option (header and data) to `out`. Returns
/// `false`, appending nothing, if a field does not fit its length field.
pub fn encode_info_option(out: &mut Vec<u8>, option: u32, name: &str, requests: &[u16]) -> bool {
    let (Ok(name_len), Ok(count)) = (u32::try_from(name.len()), u16::try_from(requests.len()))
    else {
        return false;
    };
    let Some(length) = u32::try_from(4 + name.len() + 2 + 2 * requests.len()).ok() else {
        return false;
    };
    OptionHeader { option, length }.encode(out);
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    true
}

/// Appends a whole `LIST_META_CONTEXT` or `SET_META_CONTEXT` option to `out`.
/// Returns `false`, appending nothing, if a field does not fit its length.
pub fn encode_meta_option(out: &mut Vec<u8>, option: u32, name: &str, queries: &[&str]) -> bool {
    let total = 8 + name.len() + queries.iter().map(|q| 4 + q.len()).sum::<usize>();
    let (Ok(length), Ok(count)) = (u32::try_from(total), u32::try_from(queries.len())) else {
        return false;
    };
    OptionHeader { option, length }.encode(out);
    // Every string is shorter than `total`, which fits in a u32.
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    true
}
