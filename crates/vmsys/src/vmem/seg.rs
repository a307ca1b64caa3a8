//! Boundary tags, kept in a slab.
//!
//! Every segment of the arena (a span marker, a free segment, an allocated segment) is a
//! [`Tag`] in one `Vec`, addressed by a `u32` index; unused tags form a free-index list threaded
//! through [`Tag::lnext`]. A steady-state alloc+free pair takes one tag (the split) and gives one
//! back (the coalesce), so it never touches the heap: the `Vec` only grows when the number of
//! segments reaches a new high.
//!
//! All tags of the arena are on one circular, doubly-linked list in address order (Bonwick's
//! segment list): index [`SENTINEL`] is the list head, each span's tag is followed by the
//! segments that tile it, and spans are kept sorted by address, so that a walk of the list is a
//! walk of the address space.

use alloc::vec::Vec;

/// "No tag".
pub(crate) const NIL: u32 = u32::MAX;
/// The head of the address-ordered list (never a segment).
pub(crate) const SENTINEL: u32 = 0;

/// What a tag describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The list head.
    Sentinel,
    /// The start of a span: `[start, start + size)` was added or imported as a unit.
    Span,
    /// A free segment, on the free list of its size.
    Free,
    /// An allocated segment, in the allocated-segment hash.
    Alloc,
    /// A tag on the slab's free-index list.
    Unused,
}

/// One boundary tag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tag {
    pub start: u64,
    pub size: u64,
    /// Address-ordered list.
    pub prev: u32,
    pub next: u32,
    /// Free tag: its power-of-two free list. Allocated tag: `lnext` is its hash chain.
    /// Unused tag: `lnext` is the slab's free-index list.
    pub lprev: u32,
    pub lnext: u32,
    pub kind: Kind,
    /// Span tag: the span came from the source and goes back to it when wholly free.
    pub imported: bool,
    /// Allocated tag: the segment sits in a quantum cache (only tracked when the arena verifies
    /// quantum-cache frees).
    pub cached: bool,
}

impl Tag {
    const fn blank(kind: Kind) -> Tag {
        Tag {
            start: 0,
            size: 0,
            prev: NIL,
            next: NIL,
            lprev: NIL,
            lnext: NIL,
            kind,
            imported: false,
            cached: false,
        }
    }

    /// One past the last address (spans never reach `u64::MAX`, so this cannot overflow).
    #[inline]
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The slab of tags and the address-ordered list through them.
pub(crate) struct Segs {
    pub tags: Vec<Tag>,
    free_tag: u32,
    /// Tags on the free-index list.
    pub unused: usize,
}

impl Segs {
    pub fn new() -> Segs {
        let mut head = Tag::blank(Kind::Sentinel);
        head.prev = SENTINEL;
        head.next = SENTINEL;
        let mut tags = Vec::with_capacity(64);
        tags.push(head);
        Segs {
            tags,
            free_tag: NIL,
            unused: 0,
        }
    }

    #[inline]
    pub fn t(&self, i: u32) -> &Tag {
        &self.tags[i as usize]
    }

    #[inline]
    pub fn tm(&mut self, i: u32) -> &mut Tag {
        &mut self.tags[i as usize]
    }

    /// A tag from the slab, initialised; grows the `Vec` only when no tag is unused.
    #[inline]
    pub fn get(&mut self, kind: Kind, start: u64, size: u64) -> u32 {
        let mut t = Tag::blank(kind);
        t.start = start;
        t.size = size;
        if self.free_tag != NIL {
            let i = self.free_tag;
            self.free_tag = self.t(i).lnext;
            self.unused -= 1;
            *self.tm(i) = t;
            i
        } else {
            let i = self.tags.len();
            assert!(i < NIL as usize, "vmem: more than 2^32 boundary tags");
            self.tags.push(t);
            i as u32
        }
    }

    /// Give a tag back to the slab (it must already be off every list).
    #[inline]
    pub fn put(&mut self, i: u32) {
        debug_assert_ne!(i, SENTINEL);
        let free_tag = self.free_tag;
        let t = self.tm(i);
        // Only what the audit and `get` read: `get` rewrites the whole tag.
        t.kind = Kind::Unused;
        t.imported = false;
        t.cached = false;
        t.lnext = free_tag;
        self.free_tag = i;
        self.unused += 1;
    }

    /// Link `i` into the address list just before `at`.
    #[inline]
    pub fn insert_before(&mut self, at: u32, i: u32) {
        let p = self.t(at).prev;
        self.tm(i).prev = p;
        self.tm(i).next = at;
        self.tm(p).next = i;
        self.tm(at).prev = i;
    }

    /// Link `i` into the address list just after `at`.
    #[inline]
    pub fn insert_after(&mut self, at: u32, i: u32) {
        let n = self.t(at).next;
        self.insert_before(n, i);
    }

    /// Unlink `i` from the address list.
    #[inline]
    pub fn unlink(&mut self, i: u32) {
        let (p, n) = (self.t(i).prev, self.t(i).next);
        self.tm(p).next = n;
        self.tm(n).prev = p;
    }

    /// Length of the free-index list, walked (for the audit).
    pub fn count_free_index(&self) -> Result<usize, alloc::string::String> {
        let mut n = 0;
        let mut i = self.free_tag;
        while i != NIL {
            if self.t(i).kind != Kind::Unused {
                return Err(alloc::format!(
                    "tag {i} on the slab's free list is {:?}",
                    self.t(i).kind
                ));
            }
            n += 1;
            if n > self.tags.len() {
                return Err("the slab's free list has a cycle".into());
            }
            i = self.t(i).lnext;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_recycled_without_growing_the_slab() {
        let mut s = Segs::new();
        let a = s.get(Kind::Free, 0, 8);
        s.insert_before(SENTINEL, a);
        let b = s.get(Kind::Alloc, 8, 8);
        s.insert_after(a, b);
        assert_eq!(s.t(SENTINEL).next, a);
        assert_eq!(s.t(a).next, b);
        assert_eq!(s.t(b).next, SENTINEL);
        s.unlink(b);
        s.put(b);
        let len = s.tags.len();
        let c = s.get(Kind::Free, 16, 8);
        assert_eq!(c, b);
        assert_eq!(s.tags.len(), len);
        assert_eq!(s.count_free_index().unwrap(), 0);
    }
}
