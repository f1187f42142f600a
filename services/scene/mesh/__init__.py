"""The fine stage's mesh machinery: tetrahedral grids and differentiable marching tetrahedra (DMTet)."""
