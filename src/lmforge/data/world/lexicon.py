"""The English -> French lexicon of the world: a few hundred common words, with noun genders and
feminine adjective forms so that parallel sentences can be built correctly.

Every entry is one English word -> one French word (or one fixed expression such as
"aujourd'hui"). Tests recompute nothing here: the table *is* the reference, checked by hand and
by a test of invariants (unique English keys, required pairs, genders present).
"""

from __future__ import annotations

# noun: english french gender(m|f)
_NOUNS = """
cat chat m|dog chien m|bird oiseau m|fish poisson m|horse cheval m|cow vache f|pig cochon m
sheep mouton m|mouse souris f|rabbit lapin m|duck canard m|frog grenouille f|bear ours m
wolf loup m|fox renard m|lion lion m|tiger tigre m|snake serpent m|bee abeille f|ant fourmi f
owl hibou m|eagle aigle m|whale baleine f|turtle tortue f|goat chèvre f|donkey âne m
spider araignée f|butterfly papillon m|squirrel écureuil m|elephant éléphant m|monkey singe m
camel chameau m|deer cerf m|swan cygne m|crow corbeau m|hen poule f|chicken poulet m
house maison f|school école f|town ville f|river rivière f|sea mer f|mountain montagne f
tree arbre m|flower fleur f|garden jardin m|forest forêt f|field champ m|road route f
bridge pont m|boat bateau m|car voiture f|train train m|book livre m|table table f
chair chaise f|door porte f|window fenêtre f|bed lit m|cup tasse f|plate assiette f
knife couteau m|spoon cuillère f|bread pain m|water eau f|milk lait m|cheese fromage m
apple pomme f|egg œuf m|cake gâteau m|soup soupe f|sun soleil m|moon lune f|star étoile f
sky ciel m|rain pluie f|snow neige f|wind vent m|cloud nuage m|fire feu m|stone pierre f
sand sable m|island île f|lake lac m|king roi m|queen reine f|child enfant m|boy garçon m
girl fille f|man homme m|woman femme f|friend ami m|mother mère f|father père m
brother frère m|sister sœur f|teacher professeur m|doctor médecin m|baker boulanger m
farmer fermier m|painter peintre m|sailor marin m|singer chanteur m|builder maçon m
hat chapeau m|shoe chaussure f|shirt chemise f|coat manteau m|dress robe f|key clé f
box boîte f|ball balle f|bag sac m|letter lettre f|pen stylo m|paper papier m
clock horloge f|lamp lampe f|candle bougie f|mirror miroir m|picture image f|song chanson f
game jeu m|day jour m|night nuit f|morning matin m|evening soir m|week semaine f
month mois m|year année f|winter hiver m|summer été m|spring printemps m|autumn automne m
head tête f|hand main f|foot pied m|eye œil m|ear oreille f|nose nez m|mouth bouche f
heart cœur m|leg jambe f|arm bras m|kitchen cuisine f|room chambre f|wall mur m
roof toit m|village village m|church église f|market marché m|shop magasin m
money argent m|gold or m|iron fer m|wood bois m|glass verre m|hill colline f
valley vallée f|beach plage f|wave vague f|tooth dent f|bone os m|leaf feuille f
grass herbe f|seed graine f|fruit fruit m|orange orange f|lemon citron m|pear poire f
grape raisin m|carrot carotte f|rice riz m|sugar sucre m|salt sel m|butter beurre m
meat viande f|wine vin m|tea thé m|coffee café m|honey miel m|ship navire m
plane avion m|bicycle vélo m|wheel roue f|rope corde f|ladder échelle f|basket panier m
bottle bouteille f|hammer marteau m|map carte f|story histoire f|word mot m|name nom m
voice voix f|music musique f|dream rêve m|idea idée f|question question f
answer réponse f|work travail m|party fête f|gift cadeau m|colour couleur f
number nombre m|earth terre f|world monde m|country pays m|castle château m
tower tour f|farm ferme f|port port m|hospital hôpital m|library bibliothèque f
office bureau m|street rue f|park parc m|station gare f|ticket billet m|nest nid m
"""

# adjective: english masculine feminine position(pre|post) -- "pre" adjectives go before the noun
_ADJECTIVES = """
red rouge rouge post|blue bleu bleue post|green vert verte post|yellow jaune jaune post
black noir noire post|white blanc blanche post|grey gris grise post|brown marron marron post
pink rose rose post|purple violet violette post|big grand grande pre|small petit petite pre
old vieux vieille pre|new nouveau nouvelle pre|young jeune jeune pre|hot chaud chaude post
cold froid froide post|happy heureux heureuse post|sad triste triste post
fast rapide rapide post|slow lent lente post|long long longue pre|short court courte post
beautiful beau belle pre|ugly laid laide post|good bon bonne pre|bad mauvais mauvaise pre
strong fort forte post|weak faible faible post|rich riche riche post|poor pauvre pauvre post
clean propre propre post|dirty sale sale post|full plein pleine post|empty vide vide post
easy facile facile post|difficult difficile difficile post|heavy lourd lourde post
light léger légère post|dark sombre sombre post|quiet calme calme post
loud bruyant bruyante post|sweet sucré sucrée post|soft doux douce post|hard dur dure post
wet mouillé mouillée post|dry sec sèche post|tired fatigué fatiguée post
hungry affamé affamée post|brave courageux courageuse post|kind gentil gentille post
clever intelligent intelligente post|funny drôle drôle post|round rond ronde post
"""

# verbs (infinitive) and other words: english french
_OTHER = """
eat manger|drink boire|sleep dormir|run courir|walk marcher|read lire|write écrire
sing chanter|dance danser|swim nager|play jouer|see voir|hear entendre|speak parler
listen écouter|open ouvrir|close fermer|give donner|take prendre|buy acheter|sell vendre
cook cuisiner|learn apprendre|teach enseigner|build construire|find trouver|love aimer
want vouloir|come venir|go aller|jump sauter|fly voler|climb grimper|wait attendre
help aider|think penser|know savoir|laugh rire|cry pleurer|carry porter|push pousser
pull tirer|cut couper|wash laver|yes oui|no non|hello bonjour|thanks merci
today aujourd'hui|tomorrow demain|yesterday hier|always toujours|never jamais|here ici
now maintenant|very très|often souvent|and et|with avec|without sans|one un|two deux
three trois|four quatre|five cinq|six six|seven sept|eight huit|nine neuf|ten dix
"""


def _rows(table: str) -> list[list[str]]:
    return [entry.split() for line in table.strip().splitlines() for entry in line.split("|") if entry.strip()]


# english -> (french, gender)
NOUNS: dict[str, tuple[str, str]] = {r[0]: (r[1], r[2]) for r in _rows(_NOUNS)}
# english -> (masculine, feminine, position)
ADJECTIVES: dict[str, tuple[str, str, str]] = {r[0]: (r[1], r[2], r[3]) for r in _rows(_ADJECTIVES)}
OTHER: dict[str, str] = {r[0]: r[1] for r in _rows(_OTHER)}

# the whole lexicon, english -> french (adjectives in their masculine form)
LEXICON: dict[str, str] = {
    **{en: fr for en, (fr, _) in NOUNS.items()},
    **{en: m for en, (m, _, _) in ADJECTIVES.items()},
    **OTHER,
}

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "grey", "brown", "pink", "purple"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow", "pig", "sheep", "mouse", "rabbit", "duck", "frog",
           "bear", "wolf", "fox", "owl", "goat", "donkey", "squirrel", "swan", "crow", "hen", "turtle", "bee"]
FOODS = ["fish", "grass", "seed", "honey", "apple", "bread", "cheese", "carrot", "pear", "grape", "rice", "leaf"]
OBJECTS = ["book", "hat", "ball", "key", "box", "bag", "cup", "lamp", "candle", "letter", "map", "basket",
           "bottle", "rope", "shoe", "coat", "mirror", "picture", "pen", "gift", "clock", "plate", "spoon"]
PLACES = ["garden", "forest", "field", "market", "school", "bridge", "lake", "beach", "hill", "valley",
          "park", "station", "library", "kitchen", "farm", "port", "castle", "tower", "village", "church"]

_VOWELS = set("aeiouyâàéèêëîïôœù")
# words starting with a silent h take the elided article (l'homme) like a vowel
_SILENT_H = {"homme", "hiver", "hôpital", "herbe", "histoire"}


def french_article(noun_fr: str, gender: str, definite: bool = True) -> str:
    """The article to put before a French noun.

    ("chat", "m") -> "le "; ("arbre", "m") -> "l'"; ("maison", "f", definite=False) -> "une "
    """
    if not definite:
        return "un " if gender == "m" else "une "
    if noun_fr[0] in _VOWELS or noun_fr in _SILENT_H:
        return "l'"
    return "le " if gender == "m" else "la "


def french_noun_phrase(noun: str, adjective: str | None = None, definite: bool = True) -> str:
    """An English noun (and adjective) as a French noun phrase with article and agreement.

    ("cat", "black") -> "le chat noir"; ("house", "small") -> "la petite maison";
    ("tree", None) -> "l'arbre"; ("apple", "red", definite=False) -> "une pomme rouge"
    """
    fr, gender = NOUNS[noun]
    if adjective is None:
        return french_article(fr, gender, definite) + fr
    m, f, position = ADJECTIVES[adjective]
    adj = f if gender == "f" else m
    if position == "pre":
        # the article agrees with the first word: "le petit arbre", not "l'petit arbre"
        head = adj + " " + fr
        article = ("le " if gender == "m" else "la ") if definite else ("un " if gender == "m" else "une ")
        if definite and adj[0] in _VOWELS:
            article = "l'"
        return article + head
    return french_article(fr, gender, definite) + fr + " " + adj


def plural(noun: str) -> str:
    """Regular English plural, with the irregular nouns of the lexicon.

    "cat" -> "cats"; "box" -> "boxes"; "story" -> "stories"; "mouse" -> "mice"
    """
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


_IRREGULAR_PLURALS = {
    "mouse": "mice", "sheep": "sheep", "fish": "fish", "deer": "deer", "child": "children", "man": "men",
    "woman": "women", "foot": "feet", "tooth": "teeth", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "loaf": "loaves", "rice": "rice", "money": "money", "gold": "gold", "iron": "iron", "sand": "sand",
    "grass": "grass", "water": "water", "milk": "milk", "bread": "bread", "honey": "honey", "sugar": "sugar",
    "salt": "salt", "butter": "butter", "meat": "meat", "tea": "tea", "coffee": "coffee", "wine": "wine",
    "cheese": "cheese", "music": "music", "work": "work", "snow": "snow", "rain": "rain", "wind": "wind",
}

ANTONYMS = [("hot", "cold"), ("big", "small"), ("old", "new"), ("happy", "sad"), ("fast", "slow"),
            ("long", "short"), ("good", "bad"), ("strong", "weak"), ("rich", "poor"), ("clean", "dirty"),
            ("full", "empty"), ("easy", "difficult"), ("heavy", "light"), ("wet", "dry"), ("soft", "hard"),
            ("beautiful", "ugly"), ("black", "white"), ("day", "night"), ("yes", "no"), ("open", "close"),
            ("buy", "sell"), ("push", "pull"), ("laugh", "cry"), ("give", "take"), ("always", "never"),
            ("summer", "winter"), ("king", "queen"), ("boy", "girl"), ("man", "woman"), ("father", "mother"),
            ("brother", "sister"), ("sun", "moon"), ("today", "yesterday"), ("come", "go"), ("quiet", "loud")]
