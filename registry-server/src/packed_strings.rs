//! A few short strings that live as long as a node does, kept as one.
//!
//! A `String` is 24 bytes inline and an allocation of its own, rounded up
//! to the allocator's size class: five of them (a registration's ids,
//! address and versions) are 120 bytes inline and five allocations of ~16
//! to 48 bytes. [`PackedStrings`] keeps them one after the other in one
//! boxed `str` with where each ends: 16 bytes inline for the text and 4
//! for each string but the last, one allocation of their total length.
//! Used by the registration ([`crate::registry::Registration`]), each of
//! its pool specs ([`crate::pool_specs::PoolSpec`]) and its labels
//! ([`crate::registry::Labels`], with [`pack_all`]: any number of strings).

/// `ENDS + 1` strings in one allocation, read back by position.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PackedStrings<const ENDS: usize> {
    /// The strings one after the other.
    text: Box<str>,
    /// Where each string but the last ends in `text` (the last ends with
    /// it), so the first string starts at 0 and no room is spent on it.
    ends: [u32; ENDS],
}

impl<const ENDS: usize> PackedStrings<ENDS> {
    /// Keeps `strings`, which must be `ENDS + 1` strings (checked when the
    /// program is built).
    pub fn new<const N: usize>(strings: [&str; N]) -> Self {
        let (text, ends) = pack(strings);
        Self { text, ends }
    }

    /// The `i`-th string (from 0); panics past the last (`ENDS`).
    pub fn get(&self, i: usize) -> &str {
        unpack(&self.text, &self.ends, i)
    }

    /// Every string, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..=ENDS).map(|i| self.get(i))
    }
}

/// `strings` one after the other, and where each but the last ends: the
/// parts of a [`PackedStrings`], for a type that lays them out with its
/// other fields (a pool spec puts its slot count beside the ends, where
/// the struct would otherwise leave padding). `N` must be `ENDS + 1`
/// (checked when the program is built), and the total length must fit
/// 32 bits: the strings the registry keeps come in one gRPC message, whose
/// length prefix is 32 bits.
pub fn pack<const N: usize, const ENDS: usize>(strings: [&str; N]) -> (Box<str>, [u32; ENDS]) {
    const {
        assert!(N == ENDS + 1, "pack takes ENDS + 1 strings");
    }
    let mut text = String::with_capacity(strings.iter().map(|s| s.len()).sum());
    let mut ends = [0; ENDS];
    for (i, s) in strings.iter().enumerate() {
        text.push_str(s);
        if let Some(end) = ends.get_mut(i) {
            *end = u32::try_from(text.len()).expect("strings of one message fit 4 GiB");
        }
    }
    (text.into_boxed_str(), ends)
}

/// Any number of strings one after the other, and where each of them ends
/// (the last included, so no strings and one empty string differ): for
/// lists whose length varies (a node's labels). Read back with [`unpack`];
/// there are as many strings as ends. The total length must fit 32 bits,
/// as for [`pack`].
pub fn pack_all<'a>(strings: impl IntoIterator<Item = &'a str>) -> (Box<str>, Box<[u32]>) {
    let strings: Vec<&str> = strings.into_iter().collect();
    let mut text = String::with_capacity(strings.iter().map(|s| s.len()).sum());
    let mut ends = Vec::with_capacity(strings.len());
    for s in strings {
        text.push_str(s);
        ends.push(u32::try_from(text.len()).expect("strings of one message fit 4 GiB"));
    }
    (text.into_boxed_str(), ends.into_boxed_slice())
}

/// The `i`-th string of what [`pack_all`] made (as many strings as ends);
/// panics past the last.
pub fn unpack_all<'a>(text: &'a str, ends: &[u32], i: usize) -> &'a str {
    assert!(i < ends.len(), "string {i} of {}", ends.len());
    unpack(text, ends, i)
}

/// The `i`-th string of what [`pack`] made (the last string's end is the
/// text's); panics past the last.
pub fn unpack<'a>(text: &'a str, ends: &[u32], i: usize) -> &'a str {
    assert!(i <= ends.len(), "string {i} of {}", ends.len() + 1);
    let start = match i.checked_sub(1) {
        Some(before) => ends[before] as usize,
        None => 0,
    };
    let end = ends.get(i).map_or(text.len(), |e| *e as usize);
    &text[start..end]
}

impl<const ENDS: usize> std::fmt::Debug for PackedStrings<ENDS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn strings_read_back_by_position_empty_ones_included() {
        let packed = PackedStrings::<3>::new(["node-1", "", "http://node-1:9200", "ü"]);
        assert_eq!(packed.get(0), "node-1");
        assert_eq!(packed.get(1), "");
        assert_eq!(packed.get(2), "http://node-1:9200");
        assert_eq!(packed.get(3), "ü");
        assert_eq!(
            packed.iter().collect::<Vec<_>>(),
            ["node-1", "", "http://node-1:9200", "ü"]
        );
        assert_eq!(
            format!("{packed:?}"),
            r#"["node-1", "", "http://node-1:9200", "ü"]"#
        );
        let empty = PackedStrings::<1>::new(["", ""]);
        assert_eq!((empty.get(0), empty.get(1)), ("", ""));
        // One allocation of the strings' length, and 16 + 4 per end inline.
        assert_eq!(packed.text.len(), 6 + 18 + 2);
        assert_eq!(size_of::<PackedStrings<4>>(), 32);
    }

    #[test]
    fn packs_are_equal_only_when_every_string_is() {
        let a = PackedStrings::<1>::new(["ab", "c"]);
        assert_eq!(a, PackedStrings::<1>::new(["ab", "c"]));
        assert_ne!(a, PackedStrings::<1>::new(["a", "bc"]));
    }

    #[test]
    fn lists_of_any_length_read_back_with_every_end_kept() {
        let (text, ends) = pack_all(["zone", "eu-1", "", "x"]);
        assert_eq!(&*ends, [4, 8, 8, 9]);
        let back: Vec<&str> = (0..ends.len())
            .map(|i| unpack_all(&text, &ends, i))
            .collect();
        assert_eq!(back, ["zone", "eu-1", "", "x"]);
        let past = std::panic::catch_unwind(|| unpack_all(&text, &ends, 4).to_owned());
        assert!(past.is_err(), "one past the last panics");
        let (text, ends) = pack_all([]);
        assert!(text.is_empty() && ends.is_empty(), "nothing allocated");
        let (_, one_empty) = pack_all([""]);
        assert_eq!(one_empty.len(), 1, "one empty string is not none");
    }

    #[test]
    #[should_panic(expected = "string 2 of 2")]
    fn past_the_last_string_panics() {
        let packed = PackedStrings::<1>::new(["a", "b"]);
        let _ = packed.get(2);
    }

    proptest! {
        #[test]
        fn any_strings_read_back_as_given(
            strings in proptest::array::uniform5(".{0,12}"),
        ) {
            let packed = PackedStrings::<4>::new(strings.each_ref().map(String::as_str));
            let back: Vec<&str> = packed.iter().collect();
            prop_assert_eq!(back, strings.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
