//! Physical memory: buddy allocator per domain and superpage reservations (issue 4).
