"""srmig: zero-loss VM live migration over IPv6 Segment Routing."""
