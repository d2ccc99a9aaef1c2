package extract

import "path"

// tree is the index of the nodes an image's layers built so far, by path
// relative to the tree's root. Besides the nodes it keeps each directory's
// children and every symlink, so that checking a link, removing a
// directory and an opaque whiteout cost what they touch, not the whole
// tree (a layer of 100,000 symlinks must not take a core for minutes).
type tree struct {
	nodes    map[string]*node
	children map[string]map[string]struct{} // parent ("" for the root) -> child paths
	links    map[string]string              // symlink path -> target
}

func newTree() *tree {
	return &tree{nodes: map[string]*node{}, children: map[string]map[string]struct{}{}, links: map[string]string{}}
}

func parentOf(rel string) string {
	if dir := path.Dir(rel); dir != "." {
		return dir
	}
	return ""
}

func (t *tree) get(rel string) *node { return t.nodes[rel] }

func (t *tree) len() int { return len(t.nodes) }

// set puts n at rel, replacing what was there (its children stay indexed
// below rel: callers remove a subtree before putting a non-directory in
// its place).
func (t *tree) set(rel string, n *node) {
	t.nodes[rel] = n
	parent := parentOf(rel)
	kids := t.children[parent]
	if kids == nil {
		kids = map[string]struct{}{}
		t.children[parent] = kids
	}
	kids[rel] = struct{}{}
	if n.kind == "symlink" {
		t.links[rel] = n.link
	} else {
		delete(t.links, rel)
	}
}

// removeSubtree drops rel and everything below it from the index.
func (t *tree) removeSubtree(rel string) {
	var drop func(string)
	drop = func(p string) {
		for kid := range t.children[p] {
			drop(kid)
		}
		delete(t.children, p)
		delete(t.nodes, p)
		delete(t.links, p)
	}
	drop(rel)
	if kids := t.children[parentOf(rel)]; kids != nil {
		delete(kids, rel)
		if len(kids) == 0 {
			delete(t.children, parentOf(rel))
		}
	}
}

// each calls fn for every node strictly below dir ("" for the whole tree).
func (t *tree) each(dir string, fn func(rel string, n *node)) {
	var walk func(string)
	walk = func(p string) {
		for kid := range t.children[p] {
			fn(kid, t.nodes[kid])
			walk(kid)
		}
	}
	walk(dir)
}
