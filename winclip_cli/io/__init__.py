"""Files: images in; scores, maps, memories and run state out."""
